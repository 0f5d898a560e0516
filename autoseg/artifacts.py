"""Helpers shared by every persisted artifact: atomic JSON writes, versions, hashes, and the check every
command makes of where it will write before it starts.

Artifacts are plain JSON (and ``.npy``): readable, diffable, loadable without pickle. Each records the
autoseg version and a hash of what it was built from, so a stale artifact is detected, not reused.

A command's outputs are checked before any work (:func:`check_writable`, :func:`check_not_inputs`): a folder
or file that cannot be written is one line naming it, not a traceback after an hour of work, and an output
that is one of the command's own input files is refused, never written over.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autoseg.errors import UserError
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


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """A hidden sibling folder to fill in place of ``dst`` (which must be absent or empty): renamed to ``dst``
    when the block ends, removed with all it holds when the block raises, so a failed conversion leaves nothing
    half-written."""
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.is_dir():
            dst.rmdir()  # empty (callers check it first)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a folder, or a file in the way of one)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_writable(path: Path | str, *, folder: bool = False, what: str = "output") -> None:
    """Refuse, before any work, an output ``path`` (a ``folder`` to write files into, or a file) that cannot be
    written: one in the way of the other (a file where a folder is needed, or the reverse), a file on the
    way to it, or a place this process may not write (tried: a temporary file is created and removed there,
    so the answer is the file system's, root and read-only mounts included). Creates nothing else."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder; give a folder for the {what}")
        if not folder and path.is_dir():
            raise UserError(f"{path}: is a folder; give a file name for the {what}")
    base = _nearest_existing(path if folder else path.parent)
    if not base.is_dir():
        raise UserError(f"{path}: cannot write the {what} there: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".autoseg-write-check.", suffix=".tmp", dir=base)
    except OSError as e:
        raise UserError(f"{path}: cannot write the {what} there ({base}: {e.strerror or type(e).__name__})") from e
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def check_not_inputs(outputs: Iterable[Path | str], inputs: Iterable[Path | str], hint: str = "") -> None:
    """Refuse outputs that are input files of the same command, by any name (a relative path, a link, a hard
    link: the same file on disk): writing one would destroy the input. ``hint`` ends the message (what to
    do instead)."""
    seen: dict[tuple[int, int], Path] = {}
    for p in map(Path, inputs):
        try:
            st = p.stat()
        except OSError:
            continue
        seen.setdefault((st.st_dev, st.st_ino), p)
    for out in map(Path, outputs):
        try:
            st = out.stat()
        except OSError:
            continue  # not there yet: not an input
        same = seen.get((st.st_dev, st.st_ino))
        if same is not None:
            also = "" if same == out else f" ({same})"
            raise UserError(f"{out}: is an input file{also}; writing the output there would replace it"
                            + (f"; {hint}" if hint else ""))
