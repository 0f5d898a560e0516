"""Helpers shared by every persisted artifact: atomic JSON writes, versions, hashes.

Artifacts are plain JSON (and ``.npy``): readable, diffable, loadable without pickle. Each records the
autoseg version and a hash of what it was built from, so a stale artifact is detected, not reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from autoseg.version import __version__


def atomic_write_bytes(data: bytes, path: Path | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with string keys and non-finite floats as None: JSON has no NaN (a class absent from every
    case scores NaN) and no infinity (a distance to an empty mask)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any) -> str:
    """Stable, human-readable JSON: the same object always gives the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(obj: Any, path: Path | str) -> None:
    atomic_write_bytes(dumps_json(obj).encode(), path)


def write_probabilities(maps: Any, path: Path | str) -> None:
    """Per-class probabilities as ``probabilities`` (float16, compressed) in one ``.npz``, written atomically:
    the out-of-fold outputs and ``autoseg predict --save-probabilities`` alike."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=np.asarray(maps).astype(np.float16, copy=False))
    atomic_write_bytes(buf.getvalue(), path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """Content hash of several files, in order (names excluded: a renamed dataset folder stays valid)."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def header(kind: str, **extra: Any) -> dict:
    """The first keys of every artifact: what it is, its format version and who wrote it."""
    return {"artifact": kind, "format_version": 1, "autoseg_version": __version__, **extra}
