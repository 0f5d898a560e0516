"""Image and label I/O that keeps geometry.

Arrays are channel-first in numpy axis order: an image is ``(C, Z, Y, X)`` or ``(C, Y, X)``, a label map
``(Z, Y, X)`` or ``(Y, X)``. :class:`Geometry` keeps spacing in the same axis order as the array (what
every stage computes with) and origin and direction exactly as SimpleITK gives them (physical x, y, z),
so that writing restores them bit for bit.

SimpleITK reads and writes ``.nii.gz .nii .nrrd .mha .mhd``; ``.png .bmp .tif .tiff`` are natural 2D
images: spacing 1, origin 0, identity direction, and an RGB(A) file contributes one channel per component.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import UserError

MAX_DEFLATE_RATIO = 1032  # the most a deflate (gzip) stream can expand (zlib technical details: 1032:1)
_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1,
                sitk.sitkVectorUInt16: 2, sitk.sitkVectorInt16: 2, sitk.sitkVectorFloat32: 4}
MEDICAL_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
NATURAL_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
SUPPORTED_ENDINGS = MEDICAL_ENDINGS + NATURAL_ENDINGS


@dataclass(frozen=True)
class Geometry:
    """Where an array lies in physical space.

    ``spacing`` follows the array's axis order (z, y, x); ``origin`` and ``direction`` (a row-major
    flattened matrix) follow SimpleITK's physical order (x, y, z).
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, ndim: int) -> Geometry:
        return cls((1.0,) * ndim, (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(map(float, d["spacing"])), tuple(map(float, d["origin"])),
                   tuple(map(float, d["direction"])))

    def mismatch(self, other: Geometry, rtol: float = 1e-3, atol: float = 1e-3) -> str | None:
        """Say how ``other`` differs beyond tolerance, or return None when they agree."""
        if self.ndim != other.ndim:
            return f"dimensionality {self.ndim}D vs {other.ndim}D"
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = np.maximum(np.abs(a), 1.0) if name == "origin" else 1.0
            if not np.allclose(a, b, rtol=rtol, atol=atol * scale):
                return f"{name} {_fmt(a)} vs {_fmt(b)}"
        return None


def _fmt(a: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in a) + ")"


def file_ending(path: Path | str) -> str:
    """The supported ending of ``path`` ('.nii.gz' counts as one), or its plain suffix when unsupported."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def is_natural(path: Path | str) -> bool:
    return file_ending(path) in NATURAL_ENDINGS


def read_sitk(path: Path | str) -> sitk.Image:
    """Read ``path`` with SimpleITK; a missing, unreadable or truncated file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if file_ending(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)  # before the pixels: ITK would allocate what the header claims first
    try:
        _check_claimed_size(path)
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports unreadable/truncated files as RuntimeError
        raise UserError(f"{path}: cannot read image (unreadable or truncated file){_sitk_reason(e)}") from e
    if _is_gray_palette_bmp(path, img):
        img = sitk.VectorIndexSelectionCast(img, 0)
    return img


_read_sitk = read_sitk  # the name other modules knew first


def _sitk_reason(e: RuntimeError) -> str:
    """The informative last line of a SimpleITK error, without its source-file and class-address prefixes."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("Exception thrown in SimpleITK", "Reason:"))]
    if not lines:
        return ""
    reason = lines[-1]
    for prefix in ("sitk::ERROR:", "ITK ERROR:", "[nrrd]"):
        reason = reason.removeprefix(prefix).strip()
    if "):" in reason and reason.split("(", 1)[0].isidentifier():  # "NrrdImageIO(0x55...): message"
        reason = reason.split("):", 1)[1].strip()
    return f": {reason}"


def _check_claimed_size(path: Path) -> None:
    """Refuse an image whose header claims more pixel data than this machine has memory for, from the header
    alone: reading it would fail (or swap) only after allocating all of it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    voxels = math.prod(reader.GetSize()) * max(1, reader.GetNumberOfComponents())
    claimed = voxels * _PIXEL_BYTES.get(reader.GetPixelID(), 8)
    available = available_memory()
    if available is not None and claimed > available:
        shape = "x".join(str(s) for s in reversed(reader.GetSize()))
        raise UserError(f"{path}: its header claims {shape} voxels ({claimed / 2**30:.1f} GiB of pixel data), more "
                        f"than the memory available ({available / 2**30:.1f} GiB); a damaged header, or an image "
                        "too large for this machine")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _nifti_sizes(header: bytes) -> tuple[int, int] | None:
    """(voxel data offset, voxel data bytes) from a NIfTI-1 or NIfTI-2 header, or None if it is neither."""
    for end in "<>":
        if len(header) >= 348 and struct.unpack(end + "i", header[:4])[0] == 348:
            dims = struct.unpack(end + "8h", header[40:56])
            bitpix = struct.unpack(end + "h", header[72:74])[0]
            offset = int(struct.unpack(end + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(end + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(end + "h", header[14:16])[0]
            dims = struct.unpack(end + "8q", header[16:80])
            offset = struct.unpack(end + "q", header[168:176])[0]
            break
    else:
        return None
    count = 1
    for d in dims[1:1 + max(0, min(dims[0], 7))]:
        count *= max(d, 1)
    return max(offset, 348), count * max(bitpix, 0) // 8


def _check_nifti_complete(path: Path) -> None:
    """ITK's NIfTI reader fills a truncated file's missing voxels with zeros, after allocating all the header
    claims; refuse such a file instead, before reading it (a file that is not gzip at all is left to ITK).

    A ``.nii`` must be as long as its header says. For ``.nii.gz`` the gzip trailer's length field is
    compared first (cheap); only when it disagrees is the stream decompressed to measure it for certain.
    """
    gz = file_ending(path) == ".nii.gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            sizes = _nifti_sizes(f.read(540))
    except gzip.BadGzipFile:
        return  # not gzip at all: ITK's reader says what the file is not
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: truncated or corrupt file ({e}); copy or export it again") from e
    if sizes is None:
        return
    need = sum(sizes)
    if gz and need > MAX_DEFLATE_RATIO * path.stat().st_size:  # more than gzip can hold: no need to inflate
        raise UserError(f"{path}: truncated or damaged file: its header announces {need} bytes of data, more than "
                        f"{path.stat().st_size} compressed bytes can hold; copy or export it again")
    if gz and _gzip_trailer_size(path) == need % 2**32:
        return
    have = _gunzipped_size(path, need) if gz else path.stat().st_size
    if have < need:
        raise UserError(f"{path}: truncated file: its data ends before the {need} bytes its header announces; "
                        "copy or export it again")


def _gzip_trailer_size(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _gunzipped_size(path: Path, enough: int) -> int:
    """Bytes that decompress from ``path`` before the stream ends or breaks (counting stops at ``enough``)."""
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while n < enough and (chunk := f.read(1 << 20)):
                n += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass
    return n


def _is_gray_palette_bmp(path: Path, img: sitk.Image) -> bool:
    """ITK expands an 8-bit BMP's palette to RGB; a gray palette (what a gray image is saved with) is one channel."""
    if file_ending(path) != ".bmp" or img.GetNumberOfComponentsPerPixel() != 3:
        return False
    with open(path, "rb") as f:
        head = f.read(54)
        if len(head) < 54 or struct.unpack("<H", head[28:30])[0] > 8:
            return False
        dib_size = struct.unpack("<I", head[14:18])[0]
        colors = struct.unpack("<I", head[46:50])[0] or 2 ** struct.unpack("<H", head[28:30])[0]
        f.seek(14 + dib_size)
        palette = np.frombuffer(f.read(4 * colors), np.uint8)
    palette = palette[: len(palette) // 4 * 4].reshape(-1, 4)
    return bool(np.all(palette[:, 0] == palette[:, 1]) and np.all(palette[:, 1] == palette[:, 2]))


def _geometry_of(img: sitk.Image, natural: bool) -> Geometry:
    ndim = img.GetDimension()
    if natural:
        return Geometry.identity(ndim)
    return Geometry(tuple(float(s) for s in reversed(img.GetSpacing())),
                    tuple(float(o) for o in img.GetOrigin()),
                    tuple(float(d) for d in img.GetDirection()))


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read one image file as float32 ``(C, *spatial)``; C > 1 only for vector pixels (e.g. RGB PNG)."""
    path = Path(path)
    img = read_sitk(path)
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    return np.ascontiguousarray(arr, dtype=np.float32), _geometry_of(img, is_natural(path))


def read_images(paths: Sequence[Path | str]) -> tuple[np.ndarray, Geometry]:
    """Read a case's channel files and stack them channel-first; geometry comes from the first file.

    Callers that must check agreement between channels (``validate``) read them one by one instead.
    """
    arrays, geometry = [], None
    for p in paths:
        a, g = read_image(p)
        if geometry is None:
            geometry = g
        elif a.shape[1:] != arrays[0].shape[1:]:
            raise UserError(f"{p}: shape {a.shape[1:]} differs from the case's first channel {arrays[0].shape[1:]}")
        arrays.append(a)
    if geometry is None:
        raise UserError("no image files given")
    # one file: no copy (a large CT would otherwise briefly need twice its memory)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)), geometry


def read_label(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read a label map as an integer array ``(*spatial)``; non-integer values are an error."""
    path = Path(path)
    img = read_sitk(path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        if not is_natural(path):
            raise UserError(f"{path}: label map has {img.GetNumberOfComponentsPerPixel()} components per voxel, expected 1")
        img = sitk.VectorIndexSelectionCast(img, 0)
    arr = sitk.GetArrayFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise UserError(f"{path}: label map holds non-integer values")
        arr = arr.astype(np.int32)
    if arr.min(initial=0) < 0:
        raise UserError(f"{path}: label map holds negative values")
    small = np.uint8 if arr.max(initial=0) < 256 else np.int32
    return arr.astype(small, copy=False), _geometry_of(img, is_natural(path))


def _to_sitk(array: np.ndarray, geometry: Geometry, vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(array, isVector=vector)
    if img.GetDimension() != geometry.ndim:
        raise ValueError(f"array is {img.GetDimension()}D but geometry is {geometry.ndim}D")
    img.SetSpacing(tuple(reversed(geometry.spacing)))
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def _atomic_write(img: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write into a private temporary folder beside ``path``, then rename: a failed write leaves nothing behind.

    The file keeps its final name inside that folder, so a MetaImage header (``.mhd``) names the data file
    (``.raw``/``.zraw``) it will sit next to; the data file is moved first, the header last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = file_ending(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        try:
            sitk.WriteImage(img, str(tmp_dir / path.name), useCompression=compress and ending != ".mhd")
        except RuntimeError as e:
            reason = _sitk_reason(e).replace(str(tmp_dir / path.name), path.name)
            raise UserError(f"{path}: cannot write image{reason}") from e
        for f in sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_label(array: np.ndarray, geometry: Geometry, path: Path | str, *, ids: bool = False) -> None:
    """Write a label map with the given geometry in the smallest unsigned type that holds it. ``ids``: an
    instance map (one id per object, often more than 255), which a PNG holds in 16 bits."""
    path = Path(path)
    top = int(array.max(initial=0))
    wide = ids and file_ending(path) == ".png" and top < 2**16
    if top > 255 and is_natural(path) and file_ending(path) not in (".tif", ".tiff") and not wide:
        limit = 2**16 - 1 if ids and file_ending(path) == ".png" else 255
        raise UserError(f"{path}: labels above {limit} cannot be stored in {file_ending(path)}")
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
    _atomic_write(_to_sitk(np.ascontiguousarray(array, dtype=dtype), geometry), path)


def write_image(array: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write one channel ``(*spatial)`` (float, or uint8 for natural images) with the given geometry."""
    path = Path(path)
    if is_natural(path) and file_ending(path) in (".png", ".bmp"):
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    _atomic_write(_to_sitk(np.ascontiguousarray(array), geometry), path)
