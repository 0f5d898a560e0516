"""Predictions written as DICOM objects that reference their source series: ``--output-format seg`` (a DICOM
Segmentation, :mod:`autoseg.dicom.seg`) or ``rtstruct`` (an RT Structure Set, :mod:`autoseg.dicom.rtstruct`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from autoseg.dicom import require
from autoseg.dicom.series import DicomSeries
from autoseg.errors import UserError
from autoseg.schema.labels import scored_classes

DICOM_FORMATS = {"seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}  # --output-format -> the file's ending


def check_available(fmt: str) -> None:
    """Fail before any prediction when ``fmt``'s writer cannot run here (a missing extra or module)."""
    require("pydicom")
    if fmt == "seg":
        require("highdicom")
    elif fmt == "rtstruct" and importlib.util.find_spec("autoseg.dicom.rtstruct") is None:
        raise UserError("--output-format rtstruct: RT Structure Set output is not available in this autoseg "
                        "(no autoseg.dicom.rtstruct); use --output-format seg")


def write_dicom_labels(fmt: str, labels: np.ndarray, series: DicomSeries, dataset_labels: Mapping, path: Path,
                       codes: Mapping | None = None) -> Path:
    """Write ``labels`` (z, y, x, on the grid of ``series``) as ``fmt`` (``seg`` or ``rtstruct``) to ``path``:
    one segment / ROI per class of dataset.json's ``dataset_labels`` (each region, the union of its values, for
    a region model)."""
    names = scored_classes(dataset_labels)
    if fmt == "seg":
        from autoseg.dicom.seg import write_seg

        return write_seg(labels, series, names, path, codes)
    if fmt == "rtstruct":
        check_available(fmt)
        from autoseg.dicom.rtstruct import write_rtstruct

        return Path(write_rtstruct(np.asarray(labels), series, names, path))
    raise ValueError(f"unknown DICOM output format {fmt!r}")
