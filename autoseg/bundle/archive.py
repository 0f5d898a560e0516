"""The bundle's container: a zip whose members are JSON, Markdown and safetensors, each listed with its
sha256 in ``manifest.json``, read in memory and refused at the first sign of tampering.

Nothing is extracted and nothing is unpickled: a member is bytes checked against the manifest, then
parsed as JSON or safetensors (formats without code). What is refused, each with one line naming the
file and the member:

- a truncated or damaged file (no central directory, a CRC error, a short member);
- a member path that would escape an extraction folder (absolute, ``..``, a drive letter, a backslash);
- anything that may be a pickle: a ``.pt``/``.pkl``-like name, bytes starting with the pickle protocol
  header or a nested zip (``torch.save``'s format), a kind of member the format does not have, or a member
  the manifest does not list;
- a member whose sha256 differs from the manifest's, or one the manifest lists that is missing;
- a manifest of an unknown major format version.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from autoseg.artifacts import dumps_json, sha256_bytes
from autoseg.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = "1.0"  # major.minor: a newer minor only adds keys; a newer major is refused
MEMBER_SUFFIXES = (".json", ".md", ".safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz", ".dill")
PICKLE_HEADERS = tuple(bytes([0x80, v]) for v in range(2, 6))  # PROTO opcode, protocols 2..5
ZIP_HEADER = b"PK\x03\x04"
STORED_SUFFIXES = (".safetensors",)  # float weights barely compress; store them for fast loading


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


def read_archive(path: Path | str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The verified manifest and members (name -> bytes) of the bundle at ``path``; :class:`UserError` for
    anything the module docstring lists."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such bundle file")
    try:
        with zipfile.ZipFile(path) as z:
            return _read(z, str(path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path}: not a complete autoseg bundle (truncated or damaged: {e}); "
                        "copy or download it again") from e


def _read(z: zipfile.ZipFile, where: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    infos = z.infolist()
    names = [i.filename for i in infos]
    for name in names:
        if unsafe_path(name):
            raise UserError(f"{where}: member {name!r} has a path that escapes the bundle; refusing to load it")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a member name appears twice; refusing to load it")
    if MANIFEST not in names:
        raise UserError(f"{where}: no {MANIFEST}; not an autoseg bundle")
    try:
        manifest = json.loads(z.read(MANIFEST))
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: {MANIFEST} is not a bundle manifest ({type(e).__name__}: {e})") from e
    check_format_version(version, where)  # before anything else a newer format may lay out differently
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise UserError(f"{where}: {MANIFEST} has no 'members' table of checksums")
    members: dict[str, bytes] = {}
    for info in infos:
        name = info.filename
        if name == MANIFEST:
            continue
        if may_be_pickle(name):
            raise UserError(f"{where}: member {name} may be a pickle (bundles hold only "
                            f"{', '.join(MEMBER_SUFFIXES)}); refusing to load it")
        if name not in listed:
            raise UserError(f"{where}: member {name} is not listed in {MANIFEST}; refusing to load it")
        expected = listed[name]
        if not isinstance(expected, dict) or info.file_size != expected.get("bytes"):
            raise UserError(f"{where}: member {name} has {info.file_size} bytes, the manifest says "
                            f"{expected.get('bytes') if isinstance(expected, dict) else '?'}; the file was modified")
        data = z.read(info)
        if may_be_pickle(name, data):
            raise UserError(f"{where}: member {name} starts like a pickle or a zip archive, not like a "
                            f"{name.rsplit('.', 1)[-1]} file; refusing to load it")
        if sha256_bytes(data) != expected.get("sha256"):
            raise UserError(f"{where}: member {name} does not match its sha256 in {MANIFEST}; the file was "
                            "modified or damaged")
        members[name] = data
    missing = sorted(set(listed) - set(members))
    if missing:
        raise UserError(f"{where}: member {missing[0]} is listed in {MANIFEST} but not in the file")
    return manifest, members
