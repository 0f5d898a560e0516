"""The bundle's container: a zip whose members are JSON, Markdown and safetensors, each listed with its
sha256 and size in ``manifest.json``, read as a stream and refused at the first sign of tampering.

Nothing is extracted and nothing is unpickled. Before a byte is inflated, the zip's directory is held
against the manifest and against what a real bundle weighs (a few MB to a few hundred MB of weights, some
kilobytes of JSON): a small file that claims gigabytes is refused at once. Each member is then inflated here,
a chunk at a time (not by :mod:`zipfile`, which inflates a member's whole stream whatever its header says),
hashed as it streams, refused as soon as it runs past the size the manifest declares, and parsed as what
its name says. What is refused, each with one line naming the file and the member:

- a truncated or damaged file (no central directory, a CRC error, a short member);
- a member path that would escape an extraction folder (absolute, ``..``, a drive letter, a backslash);
- anything that may be a pickle: a ``.pt``/``.pkl``-like name, bytes starting with the pickle protocol
  header or a nested zip (``torch.save``'s format), a member the manifest does not list;
- a member the format does not define (:mod:`autoseg.bundle.layout`), or one that does not parse as what
  its name says (JSON, UTF-8 text, safetensors);
- sizes past the bounds below, a member inflating past its declared size, members sharing compressed bytes;
- a member whose sha256 differs from the manifest's, or one the manifest lists that is missing;
- a manifest of an unknown major format version.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

from autoseg.artifacts import dumps_json, sha256_bytes
from autoseg.bundle.layout import (
    CARD,
    MANIFEST,
    MAX_HEADER_BYTES,
    PLANS_MEMBER,
    POSTPROCESSING,
    SAFETENSORS,
    format_problem,
    member_kind,
)
from autoseg.errors import UserError

FORMAT_VERSION = "1.0"  # major.minor: a newer minor only adds keys; a newer major is refused
MEMBER_SUFFIXES = (".json", ".md", ".safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz", ".dill")
PICKLE_HEADERS = tuple(bytes([0x80, v]) for v in range(2, 6))  # PROTO opcode, protocols 2..5
ZIP_HEADER = b"PK\x03\x04"
STORED_SUFFIXES = (".safetensors",)  # float weights barely compress; store them for fast loading

# What a real bundle weighs, with room to spare: refused beyond, before anything is inflated.
MAX_MEMBERS = 1024  # a bundle has 4 members and one per fold and configuration
MAX_TEXT_BYTES = 16 << 20  # each JSON or Markdown member (kilobytes in practice)
MAX_WEIGHTS_BYTES = 4 << 30  # each fold's safetensors (a few MB to a few hundred MB in practice)
MAX_TOTAL_BYTES = 16 << 30  # all members together, inflated
MAX_WEIGHTS_RATIO = 16  # float weights barely deflate (pack stores them); a bomb deflates ~1000x
RATIO_FREE_BYTES = 1 << 20  # weights this small may compress as well as they like (zero-filled tensors)
CHUNK = 1 << 20  # inflated bytes held at a time while hashing
LOCAL_HEADER = 30  # bytes of a zip local file header before its name


def write_archive(members: Mapping[str, bytes], manifest: dict[str, Any], path: Path | str) -> Path:
    """Write ``members`` and ``manifest.json`` (given the members' sha256 and sizes) to ``path`` atomically."""
    path = Path(path)
    manifest = {**manifest, "members": {name: {"sha256": sha256_bytes(data), "bytes": len(data)}
                                        for name, data in members.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w") as z:
            for name, data in {MANIFEST: dumps_json(manifest).encode(), **members}.items():
                kind = zipfile.ZIP_STORED if name.endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
                z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=kind)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def unsafe_path(name: str) -> bool:
    """True for a member name that is not a plain relative path inside the archive."""
    if not name or "\\" in name or name.startswith("/") or "\0" in name:
        return True
    parts = PurePosixPath(name).parts
    return any(p in ("..", ".", "") for p in parts) or ":" in parts[0]


def is_safetensors(data: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then that many bytes of JSON. (Its
    first bytes alone may look like a pickle's: a 1408-byte header starts ``80 05``.)"""
    n = int.from_bytes(data[:8], "little")
    return len(data) >= 10 and data[8:9] == b"{" and 8 + n <= len(data)


def may_be_pickle(name: str, data: bytes | None = None) -> bool:
    """A name the format does not have or one used for pickles; with ``data``: bytes that are not what the
    name says (a weights member not laid out as safetensors, text starting like a pickle or a zip)."""
    if name.lower().endswith(PICKLE_SUFFIXES) or not name.endswith(MEMBER_SUFFIXES):
        return True
    if data is None:
        return False
    if name.endswith(".safetensors"):
        return not is_safetensors(data)
    return data.startswith(PICKLE_HEADERS) or data.startswith(ZIP_HEADER)


def check_format_version(version: object, where: str) -> None:
    major = str(version).split(".")[0]
    if not major.isdigit():
        raise UserError(f"{where}: format_version {version!r} is not MAJOR.MINOR; the file is not an autoseg bundle")
    if int(major) != int(FORMAT_VERSION.split(".")[0]):
        raise UserError(f"{where}: bundle format {version} is not supported by autoseg (it reads format "
                        f"{FORMAT_VERSION.split('.')[0]}.x); use the autoseg version that wrote it "
                        "or re-export the bundle from its workdir")


def read_archive(path: Path | str, keep: Callable[[str], bool] | None = None,
                 heads: dict[str, bytes] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The verified manifest and members (name -> bytes) of the bundle at ``path``; :class:`UserError` for
    anything the module docstring lists. Every member is read, hashed and parsed, as a stream; only those
    ``keep`` accepts (default: all) are returned, so a check holds no weights in memory. ``heads``, when
    given, receives the header bytes of each weights member not kept (its tensors' names, dtypes, shapes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such bundle file")
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            return _read(z, f, str(path), os.fstat(f.fileno()).st_size, keep or (lambda name: True), heads)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path}: not a complete autoseg bundle (truncated or damaged: {e}); "
                        "copy or download it again") from e


def _read(z: zipfile.ZipFile, f: IO[bytes], where: str, file_bytes: int, keep: Callable[[str], bool],
          heads: dict[str, bytes] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise UserError(f"{where}: {len(infos)} members, more than a bundle holds ({MAX_MEMBERS}); refusing to load it")
    names = [i.filename for i in infos]
    for name in names:
        if unsafe_path(name):
            raise UserError(f"{where}: member {name!r} has a path that escapes the bundle; refusing to load it")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a member name appears twice; refusing to load it")
    if MANIFEST not in names:
        raise UserError(f"{where}: no {MANIFEST}; not an autoseg bundle")
    if sum(i.compress_size + LOCAL_HEADER for i in infos) > file_bytes:  # members sharing bytes: a zip bomb
        raise UserError(f"{where}: its members claim more compressed bytes than the file's {file_bytes}; "
                        "refusing to load it")
    manifest = _read_manifest(f, infos[names.index(MANIFEST)], where)
    listed = manifest["members"]
    plan = [(info, *_declared(info, listed, where)) for info in infos if info.filename != MANIFEST]
    total = sum(size for _, _, size, _ in plan)
    if total > MAX_TOTAL_BYTES:
        raise UserError(f"{where}: its members declare {total} bytes in all, more than a bundle may hold "
                        f"({MAX_TOTAL_BYTES}); refusing to inflate them")
    missing = sorted(set(listed) - set(names))
    if missing:
        raise UserError(f"{where}: member {missing[0]} is listed in {MANIFEST} but not in the file")
    members: dict[str, bytes] = {}
    for info, kind, size, sha256 in plan:
        kept = keep(info.filename)
        data = _read_member(f, info, kind, size, sha256, where, kept)
        if kept:
            members[info.filename] = data
        elif heads is not None and kind == SAFETENSORS:
            heads[info.filename] = data
    return manifest, members


def _read_manifest(f: IO[bytes], info: zipfile.ZipInfo, where: str) -> dict[str, Any]:
    if info.file_size > MAX_TEXT_BYTES:
        raise UserError(f"{where}: {MANIFEST} claims {info.file_size} bytes, more than a manifest may hold "
                        f"({MAX_TEXT_BYTES}); refusing to inflate it")
    raw = b"".join(_inflate(f, info, min(info.file_size, MAX_TEXT_BYTES), where))
    try:
        manifest = json.loads(raw.decode("utf-8"))
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{where}: {MANIFEST} is not a bundle manifest ({type(e).__name__}: {e})") from e
    check_format_version(version, where)  # before anything else a newer format may lay out differently
    if not isinstance(manifest.get("members"), dict):
        raise UserError(f"{where}: {MANIFEST} has no 'members' table of checksums")
    return manifest


def _declared(info: zipfile.ZipInfo, listed: dict[str, Any], where: str) -> tuple[str, int, str]:
    """(kind, inflated bytes, sha256) the manifest declares for a member, once its name, its zip header and
    its size have been held against the format, the manifest and a bundle's bounds; nothing is inflated."""
    name = info.filename
    if may_be_pickle(name):
        raise UserError(f"{where}: member {name} may be a pickle (bundles hold only "
                        f"{', '.join(MEMBER_SUFFIXES)}); refusing to load it")
    if name not in listed:
        raise UserError(f"{where}: member {name} is not listed in {MANIFEST}; refusing to load it")
    kind = member_kind(name)
    if kind is None:
        raise UserError(f"{where}: member {name} is not part of the bundle format (it has {CARD}, {PLANS_MEMBER}, "
                        f"{POSTPROCESSING} and weights/CONFIGURATION/fold_K.safetensors); refusing to load it")
    expected = listed[name]
    size = expected.get("bytes") if isinstance(expected, dict) else None
    sha256 = expected.get("sha256") if isinstance(expected, dict) else None
    if type(size) is not int or size < 0 or not isinstance(sha256, str):
        raise UserError(f"{where}: {MANIFEST} gives no size and sha256 for member {name}; refusing to load it")
    if info.file_size != size:
        raise UserError(f"{where}: member {name} has {info.file_size} bytes, the manifest says {size}; "
                        "the file was modified")
    cap = MAX_WEIGHTS_BYTES if kind == SAFETENSORS else MAX_TEXT_BYTES
    if size > cap:
        raise UserError(f"{where}: member {name} declares {size} bytes, more than a bundle's {kind} member may "
                        f"hold ({cap}); refusing to inflate it")
    if kind == SAFETENSORS and size > max(RATIO_FREE_BYTES, MAX_WEIGHTS_RATIO * info.compress_size):
        raise UserError(f"{where}: member {name} would inflate {info.compress_size} bytes to {size}, "
                        f"{size // max(info.compress_size, 1)}x (weights barely compress); refusing to inflate it")
    return kind, size, sha256


def _read_member(f: IO[bytes], info: zipfile.ZipInfo, kind: str, size: int, sha256: str, where: str,
                 keep: bool) -> bytes:
    """Stream one member: hash it and parse it as ``kind``; its bytes when ``keep`` or when it is text (parsed
    whole, and small), else the safetensors header alone. At most :data:`CHUNK` bytes of weights beyond their
    header are held when not kept."""
    name = info.filename
    digest = hashlib.sha256()
    whole = keep or kind != SAFETENSORS
    parts: list[bytes] = []
    head = bytearray()  # the safetensors header, when the weights are not kept
    for chunk in _inflate(f, info, size, where):
        digest.update(chunk)
        if whole:
            parts.append(chunk)
            continue
        while chunk and len(head) < (need := _safetensors_head_bytes(head, size)):
            take = need - len(head)
            head += chunk[:take]
            chunk = chunk[take:]
    data = b"".join(parts) if whole else bytes(head)
    if kind != SAFETENSORS and (data.startswith(PICKLE_HEADERS) or data.startswith(ZIP_HEADER)):
        raise UserError(f"{where}: member {name} starts like a pickle or a zip archive, not like a "
                        f"{name.rsplit('.', 1)[-1]} file; refusing to load it")
    if digest.hexdigest() != sha256:
        raise UserError(f"{where}: member {name} does not match its sha256 in {MANIFEST}; the file was "
                        "modified or damaged")
    problem = format_problem(kind, data, size)
    if problem:
        raise UserError(f"{where}: member {name} is not {kind} ({problem}); refusing to load it")
    return data


def _inflate(f: IO[bytes], info: zipfile.ZipInfo, size: int, where: str) -> Iterator[bytes]:
    """The member's bytes, at most :data:`CHUNK` at a time, exactly ``size`` of them (the manifest's, not the
    zip header's): a :class:`UserError` as soon as it inflates past them, EOFError when it ends short or its
    compressed data does not end where the directory says."""
    name = info.filename
    if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserError(f"{where}: member {name} is encrypted or compressed in a way bundles are not "
                        f"(zip method {info.compress_type}); refusing to load it")
    f.seek(info.header_offset)
    head = f.read(LOCAL_HEADER)
    if len(head) < LOCAL_HEADER or head[:4] != ZIP_HEADER:
        raise EOFError(f"member {name} has no local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if f.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace") != info.orig_filename:
        raise EOFError(f"member {name}: its local header names another file")
    f.seek(extra_len, os.SEEK_CUR)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
    left, produced, crc = info.compress_size, 0, 0
    while left > 0 and not (inflater is not None and inflater.eof):
        raw = f.read(min(CHUNK, left))
        if not raw:
            raise EOFError(f"member {name} is cut short")
        left -= len(raw)
        while raw:
            out = raw if inflater is None else inflater.decompress(raw, CHUNK)
            raw = b"" if inflater is None else inflater.unconsumed_tail
            produced += len(out)
            if produced > size:
                raise UserError(f"{where}: member {name} inflates past the {size} bytes the manifest declares; "
                                "refusing to inflate it")
            crc = zlib.crc32(out, crc)
            if out:
                yield out
    if left or (inflater is not None and (not inflater.eof or inflater.unused_data)):
        raise EOFError(f"member {name}: its compressed data does not end where the zip directory says")
    if produced != size or crc != info.CRC:
        raise EOFError(f"member {name}: {produced} bytes (CRC {crc:08x}), the zip directory says "
                       f"{info.file_size} (CRC {info.CRC:08x})")


def _safetensors_head_bytes(prefix: bytes | bytearray, size: int) -> int:
    """How many leading bytes of a safetensors member hold its header (8 until the length is known)."""
    if len(prefix) < 8:
        return 8
    return min(size, 8 + int.from_bytes(prefix[:8], "little"), 8 + MAX_HEADER_BYTES)
