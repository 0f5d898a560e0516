"""Image and label I/O that keeps geometry.

Arrays are channel-first in numpy axis order: an image is ``(C, Z, Y, X)`` or ``(C, Y, X)``, a label map
``(Z, Y, X)`` or ``(Y, X)``. :class:`Geometry` keeps spacing in the same axis order as the array (what
every stage computes with) and origin and direction exactly as SimpleITK gives them (physical x, y, z),
so that writing restores them bit for bit.

SimpleITK reads and writes ``.nii.gz .nii .nrrd .mha .mhd``; ``.png .bmp .tif .tiff`` are natural 2D
images: spacing 1, origin 0, identity direction, and an RGB(A) file contributes one channel per component.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import UserError

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


def _read_sitk(path: Path) -> sitk.Image:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports unreadable/truncated files as RuntimeError
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and "ITK ERROR" not in ln), "")
        raise UserError(f"{path}: cannot read image (unreadable or truncated file){': ' + first if first else ''}") from e


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
    img = _read_sitk(path)
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
    return np.concatenate(arrays, axis=0), geometry


def read_label(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read a label map as an integer array ``(*spatial)``; non-integer values are an error."""
    path = Path(path)
    img = _read_sitk(path)
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
    """Write to a temporary name in the same folder, then rename: a killed write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = file_ending(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ending, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, useCompression=compress and ending != ".mhd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_label(array: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write a label map with the given geometry (uint8 when it fits, else uint16)."""
    path = Path(path)
    if array.max(initial=0) > 255 and is_natural(path) and file_ending(path) != ".tif" and file_ending(path) != ".tiff":
        raise UserError(f"{path}: labels above 255 cannot be stored in {file_ending(path)}")
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    _atomic_write(_to_sitk(np.ascontiguousarray(array, dtype=dtype), geometry), path)


def write_image(array: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write one channel ``(*spatial)`` (float, or uint8 for natural images) with the given geometry."""
    path = Path(path)
    if is_natural(path) and file_ending(path) in (".png", ".bmp"):
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    _atomic_write(_to_sitk(np.ascontiguousarray(array), geometry), path)
