"""Predictions written as DICOM objects that reference their source series: ``--output-format seg`` (a DICOM
Segmentation, :mod:`autoseg.dicom.seg`) or ``rtstruct`` (an RT Structure Set, :mod:`autoseg.dicom.rtstruct`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.dicom import require
from autoseg.dicom.series import DicomSeries
from autoseg.errors import UserError
from autoseg.schema.labels import foreground_classes, regions_of

DICOM_FORMATS = {"seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}  # --output-format -> the file's ending


def class_names(labels: Mapping, regions_class_order: list[int] | tuple[int, ...] = ()) -> dict[int, str]:
    """Label value -> class name of what a prediction holds (dataset.json's ``labels``): the foreground values;
    for a region model, the value each region paints (``regions_class_order``) named after the region."""
    regions = regions_of(labels)
    if regions:
        return {int(v): name for v, name in zip(regions_class_order, regions)}
    return dict(sorted(foreground_classes(dict(labels)).items()))


def check_available(fmt: str) -> None:
    """Fail before any prediction when ``fmt``'s writer cannot run here (a missing extra or module)."""
    require("pydicom")
    if fmt == "seg":
        require("highdicom")
    elif fmt == "rtstruct" and importlib.util.find_spec("autoseg.dicom.rtstruct") is None:
        raise UserError("--output-format rtstruct: RT Structure Set output is not available in this autoseg "
                        "(no autoseg.dicom.rtstruct); use --output-format seg")


def write_dicom_labels(fmt: str, labels: np.ndarray, series: DicomSeries, names: Mapping[int, str], path: Path,
                       codes: Mapping | None = None) -> Path:
    """Write ``labels`` (z, y, x, on the grid of ``series``) as ``fmt`` (``seg`` or ``rtstruct``) to ``path``."""
    if fmt == "seg":
        from autoseg.dicom.seg import write_seg

        return write_seg(labels, series, names, path, codes)
    if fmt == "rtstruct":
        check_available(fmt)
        from autoseg.dicom import rtstruct

        image = sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint16))
        image.CopyInformation(series.image)
        rtstruct.write_rtstruct(image, series, dict(names), path)
        return Path(path)
    raise ValueError(f"unknown DICOM output format {fmt!r}")
