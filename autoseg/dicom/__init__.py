"""DICOM in and out (the optional extra ``autoseg[dicom]``: pydicom, highdicom).

- :mod:`autoseg.dicom.series`: image series found in a folder tree by SeriesInstanceUID and built with their
  geometry (:class:`DicomSeries`); which series a prediction takes (:mod:`autoseg.dicom.choose`).
- :mod:`autoseg.dicom.seg`: a label map written as a DICOM Segmentation object, and read back.
- :mod:`autoseg.dicom.rtstruct`: RT Structure Sets.
- :mod:`autoseg.dicom.convert`: ``autoseg convert-dicom``: studies with SEG / RTSTRUCT labels to a dataset.

pydicom and highdicom are imported where they are used, so ``import autoseg`` works without them;
:func:`require` turns their absence into one line naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from autoseg.errors import UserError

EXTRA = "pip install 'autoseg[dicom]'"


def require(module: str) -> ModuleType:
    """Import ``module`` (``pydicom``, ``highdicom``) or fail with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"DICOM support needs {module.split('.')[0]}, which is not installed: {EXTRA}") from e
