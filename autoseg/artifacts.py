"""Helpers shared by every persisted artifact: atomic JSON writes, versions, hashes.

Artifacts are plain JSON (and ``.npy``): readable, diffable, loadable without pickle. Each records the
autoseg version and a hash of what it was built from, so a stale artifact is detected, not reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autoseg import __version__


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


def dumps_json(obj: Any) -> str:
    """Stable, human-readable JSON: the same object always gives the same bytes."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(obj: Any, path: Path | str) -> None:
    atomic_write_bytes(dumps_json(obj).encode(), path)


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
