"""DICOM image series in a folder tree: found by SeriesInstanceUID, built with their geometry.

A hospital export is a folder (often nested: patient / study / series) of one file per slice, named anything
(``IM0001``, ``1.2.840....dcm``), in any order. Slice order and spacing come from ImagePositionPatient
projected on the normal of ImageOrientationPatient, never from file names or InstanceNumber; the direction
from ImageOrientationPatient; the voxel values from the stored values with RescaleSlope / RescaleIntercept
applied (HU for CT). What the reader cannot turn into a regular grid is refused with one line naming a file:
a gantry tilt (slices not stacked along their normal), uneven spacing, a missing slice, two slices at one
position, slices of different size or orientation, an unreadable or cut file.

>>> found = find_series("export/")                             # doctest: +SKIP
>>> found.series[0].image.GetSpacing()                         # doctest: +SKIP

Non-image objects (SEG, RTSTRUCT, SR, ...) met on the way are listed in :attr:`DicomFolder.objects`, for
``convert-dicom`` to read its labels from and for messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from autoseg.dicom import require
from autoseg.errors import UserError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Files with these endings are never DICOM; anything else (no ending, .dcm, .ima, a UID) is read as DICOM.
NOT_DICOM_ENDINGS = (".txt", ".md", ".json", ".csv", ".xml", ".html", ".pdf", ".jpg", ".jpeg", ".png", ".zip",
                     ".gz", ".nii", ".nrrd", ".mha", ".mhd", ".py", ".log", ".ini")
# Modalities of objects that hold no image slices, however much they look like one (RT dose is a grid of doses).
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN")
POSITION_TOL_MM = 0.01  # positions are written with a few decimals; slices closer than this are at one place
SPACING_RTOL = 0.01  # slice gaps may differ this much (relative) before the spacing counts as uneven


@dataclass(frozen=True)
class DicomObject:
    """A DICOM file that is not a slice of an image series (a SEG, an RTSTRUCT, a report, ...)."""

    path: Path
    modality: str
    sop_class: str
    series_uid: str


@dataclass(eq=False)
class DicomSeries:
    """One image series: its files and headers sorted along the slice normal (the order the image's z axis
    takes); :attr:`image` reads the pixels on first use (a SimpleITK image, float32, rescale applied).
    The SEG and RTSTRUCT writers reference :attr:`datasets` (headers, no pixel data)."""

    uid: str
    description: str
    modality: str
    files: tuple[Path, ...]
    datasets: tuple[Any, ...] = field(repr=False)

    def describe(self) -> str:
        """One phrase for listings: UID, modality, description, slices and where."""
        folders = sorted({str(f.parent) for f in self.files})
        where = folders[0] + (f" (+{len(folders) - 1} folders)" if len(folders) > 1 else "")
        return f"{self.uid} ({self.modality}, '{self.description}', {len(self.files)} files in {where})"

    @cached_property
    def image(self) -> sitk.Image:
        """The series as a 3D image, with its geometry checked (:func:`series_geometry`)."""
        spacing, origin, direction = series_geometry(self)
        slices = [_pixels(path) for path in self.files]
        array = np.stack(slices).astype(np.float32)
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
        return img


@dataclass
class DicomFolder:
    """What :func:`find_series` found under a folder: image series (sorted by description, then UID) and
    the other DICOM objects."""

    root: Path
    series: list[DicomSeries]
    objects: list[DicomObject]

    def by_uid(self, uid: str) -> DicomSeries | None:
        return next((s for s in self.series if s.uid == uid), None)


def reason(e: BaseException) -> str:
    """An exception as one short line (pydicom's decoders report one line per plugin)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


def read_header(path: Path) -> Dataset:
    """The DICOM header of ``path`` (no pixel data), or one line naming the file and what is wrong."""
    pydicom = require("pydicom")
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError as e:
        raise UserError(f"{path}: not a DICOM file ({reason(e)})") from e
    except Exception as e:  # noqa: BLE001  a cut or garbled file fails in many ways inside pydicom
        raise UserError(f"{path}: unreadable DICOM file ({reason(e)})") from e


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return [p for p in sorted(root.rglob("*")) if p.is_file() and not any(part.startswith(".") for part in
            p.relative_to(root).parts) and not p.name.lower().endswith(NOT_DICOM_ENDINGS)]


def is_dicom_folder(path: Path | str, look_at: int = 20) -> bool:
    """Whether ``path`` is a folder where one of the first ``look_at`` files (in name order, searched in depth)
    starts like a DICOM file (the ``DICM`` marker after the 128-byte preamble): what ``autoseg predict`` reads
    as DICOM input."""
    path = Path(path)
    if not path.is_dir():
        return False
    for p in _files(path)[:look_at]:
        try:
            with open(p, "rb") as f:
                if f.read(132)[128:132] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def find_series(root: Path | str) -> DicomFolder:
    """Every image series under ``root`` (a folder, searched in depth; or one file), grouped by
    SeriesInstanceUID, each sorted along its normal. A file that is not DICOM or cannot be read is one
    :class:`UserError` naming it (files ending in ``.txt``, ``.json``, ... are skipped)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    objects = []
    for path in _files(root):
        ds = read_header(path)
        modality = str(ds.get("Modality", ""))
        uid = str(ds.get("SeriesInstanceUID", ""))
        if modality in NON_IMAGE_MODALITIES or "Rows" not in ds or not uid:
            objects.append(DicomObject(path, modality, _sop_class_name(ds), uid))
            continue
        groups.setdefault(uid, []).append((path, ds))
    series = [_series(uid, members) for uid, members in groups.items()]
    return DicomFolder(root, sorted(series, key=lambda s: (s.description, s.uid)), objects)


def _sop_class_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", str(uid)) if uid is not None else "no SOP class"


def _series(uid: str, members: list[tuple[Path, Any]]) -> DicomSeries:
    first = members[0][1]
    normal = _normal(first, members[0][0]) if "ImageOrientationPatient" in first else None
    if normal is not None and all("ImagePositionPatient" in ds for _, ds in members):
        members = sorted(members, key=lambda m: (float(np.dot(_position(m[1]), normal)), str(m[0])))
    else:
        members = sorted(members, key=lambda m: (int(m[1].get("InstanceNumber") or 0), str(m[0])))
    return DicomSeries(uid, str(first.get("SeriesDescription", "")), str(first.get("Modality", "")),
                       tuple(p for p, _ in members), tuple(ds for _, ds in members))


def _orientation(ds: Any, path: Path) -> np.ndarray:
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: no usable ImageOrientationPatient ({reason(e)})") from e
    if iop.shape != (6,):
        raise UserError(f"{path}: ImageOrientationPatient has {iop.size} values, not 6")
    return iop


def _normal(ds: Any, path: Path) -> np.ndarray:
    iop = _orientation(ds, path)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise UserError(f"{path}: ImageOrientationPatient's row and column directions are parallel")
    return n / norm


def _position(ds: Any) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)


def series_geometry(series: DicomSeries) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) of the series as SimpleITK states them, after checking that its slices
    make a regular grid; else one :class:`UserError` naming the first file that breaks it."""
    files, headers = series.files, series.datasets
    first, path0 = headers[0], files[0]
    for path, ds in zip(files, headers):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise UserError(f"{path}: a multi-frame image ({ds.NumberOfFrames} frames in one file); autoseg reads "
                            "series of single-frame slices (export the series as classic CT/MR images)")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise UserError(f"{path}: a colour image ({ds.SamplesPerPixel} samples per pixel); autoseg reads "
                            "grey-scale CT/MR series")
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds:
                raise UserError(f"{path}: no {key}, so the slice cannot be placed in the patient; not an image "
                                "series autoseg can read (a screenshot or secondary capture?)")
    iop = _orientation(first, path0)
    normal = _normal(first, path0)
    size = (int(first.Rows), int(first.Columns))
    pixel_spacing = np.array([float(v) for v in first.PixelSpacing])
    for path, ds in zip(files[1:], headers[1:]):
        if not np.allclose(_orientation(ds, path), iop, atol=1e-4):
            raise UserError(f"{path}: ImageOrientationPatient differs from that of {path0.name} in the same series "
                            f"{series.uid}; a series must be one stack of parallel slices")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise UserError(f"{path}: {ds.Rows}x{ds.Columns} pixels where {path0.name} of the same series has "
                            f"{size[0]}x{size[1]}")
        if not np.allclose([float(v) for v in ds.PixelSpacing], pixel_spacing, rtol=1e-4, atol=1e-5):
            raise UserError(f"{path}: PixelSpacing {list(ds.PixelSpacing)} differs from {path0.name}'s "
                            f"{pixel_spacing.tolist()} in the same series")
    positions = np.array([_position(ds) for ds in headers])
    spacing_z = _slice_spacing(series, positions, normal)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    direction = np.column_stack([row, col, normal])
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), float(spacing_z))  # x = along a row = columns
    return spacing, tuple(float(v) for v in positions[0]), tuple(float(v) for v in direction.ravel())


def _slice_spacing(series: DicomSeries, positions: np.ndarray, normal: np.ndarray) -> float:
    files, first = series.files, series.datasets[0]
    if len(files) == 1:
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            if first.get(key) not in (None, ""):
                return float(first.get(key))
        return 1.0
    offsets = positions - positions[0]
    along = offsets @ normal
    sideways = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    k = int(np.argmax(sideways - POSITION_TOL_MM - 1e-3 * np.abs(along)))
    if sideways[k] > POSITION_TOL_MM + 1e-3 * abs(along[k]):
        tilt = np.degrees(np.arctan2(sideways[k], abs(along[k]))) if along[k] else 90.0
        raise UserError(f"{files[k]}: the slices are not stacked along their normal (shifted {sideways[k]:.3g} mm "
                        f"sideways, a gantry tilt of about {tilt:.3g} degrees); autoseg reads untilted series only: "
                        "resample the series onto a regular grid first")
    gaps = np.diff(along)
    for i, gap in enumerate(gaps):
        if gap < POSITION_TOL_MM:
            raise UserError(f"{files[i + 1]}: at the same position as {files[i].name} in series {series.uid} "
                            "(a duplicate slice, or two acquisitions in one series)")
    step = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if abs(gap - step) > max(POSITION_TOL_MM, SPACING_RTOL * step):
            missing = round(gap / step) - 1
            if missing >= 1 and abs(gap - (missing + 1) * step) <= max(POSITION_TOL_MM, SPACING_RTOL * step):
                raise UserError(f"{files[i + 1]}: {missing} slice(s) missing before it in series {series.uid} "
                                f"(a gap of {gap:.4g} mm after {files[i].name} where the others are {step:.4g} mm)")
            raise UserError(f"{files[i + 1]}: uneven slice spacing in series {series.uid} ({gap:.4g} mm after "
                            f"{files[i].name} where the others are {step:.4g} mm); resample it onto a regular grid")
    return float((along[-1] - along[0]) / (len(files) - 1))


def _pixels(path: Path) -> np.ndarray:
    """One slice's values with its rescale applied (float64), or one line naming the file."""
    pydicom = require("pydicom")
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001  a cut or garbled file fails in many ways inside pydicom
        raise UserError(f"{path}: unreadable DICOM file ({reason(e)})") from e
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001  truncated pixel data, an unsupported compression
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise UserError(f"{path}: compressed pixel data ({syntax.name}) that cannot be decoded here "
                            f"({reason(e)}); install pydicom's decoders (pip install pylibjpeg "
                            "pylibjpeg-libjpeg pylibjpeg-openjpeg) or decompress the series (gdcmconv --raw)") from e
        raise UserError(f"{path}: the pixel data cannot be read ({reason(e)})") from e
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float64) * slope + intercept
