"""Label maps as DICOM Segmentation objects (SEG), through highdicom, and read back.

A SEG written here references every slice of its source series (one frame per slice and segment, in the
source's geometry), with one segment per class named from dataset.json: a label value, or for a region model
each region (the union of its values; regions overlap, as binary segments may). A segment's coded category
and type come from the user's codes where given (``--segment-codes FILE``: ``{"liver": {"category":
"SCT:91723000:Anatomical Structure", "type": "SCT:10200004:Liver"}}``), else a generic "Tissue" code with
the class name as the segment's label, so a viewer shows the name either way. The model may carry codes
(dataset.json's ``segment_codes`` -> selection.json -> the bundle manifest, or ``autoseg bundle
--segment-codes``): predict uses them, a ``--segment-codes`` file overriding them class by class.

>>> write_seg(labels, series, {1: "liver", 2: "tumour"}, Path("out/case.seg.dcm"))   # doctest: +SKIP
>>> labels, names = read_seg(Path("out/case.seg.dcm"), series)                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.dicom import require
from autoseg.dicom.series import DicomSeries, reason
from autoseg.errors import UserError
from autoseg.schema.labels import ClassKey, key_values
from autoseg.schema.segment_codes import GENERIC_CATEGORY, GENERIC_TYPE, Codes, parse_segment_codes
from autoseg.version import __version__

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def read_segment_codes(path: Path | str) -> Codes:
    """A codes file: class name -> ``{"category": "SCHEME:VALUE:MEANING", "type": "SCHEME:VALUE:MEANING"}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file of segment codes ({reason(e)})") from e
    return parse_segment_codes(raw, str(path))


def _concept(code: tuple[str, str, str]) -> Any:
    hd = require("highdicom")
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_seg(labels: np.ndarray, series: DicomSeries, class_names: Mapping[ClassKey, str], path: Path | str,
              codes: Mapping[str, Mapping[str, tuple[str, str, str]]] | None = None,
              series_description: str = "autoseg segmentation") -> Path:
    """Write the label map ``labels`` (z, y, x: the series' slices in :attr:`DicomSeries.files` order) as a
    binary DICOM SEG referencing ``series``: one segment per class of ``class_names`` (a label value, or a
    region's values as a tuple -> name, as :func:`autoseg.schema.labels.scored_classes` gives), numbered 1.. in
    that order. Written to a temporary name and renamed."""
    hd = require("highdicom")
    from pydicom.sr.codedict import codes as dcm_codes

    path = Path(path)
    labels = np.asarray(labels)
    rows, cols = int(series.datasets[0].Rows), int(series.datasets[0].Columns)
    if labels.shape != (len(series.files), rows, cols):
        raise ValueError(f"labels {labels.shape} do not match series {series.uid} "
                         f"({len(series.files)} slices of {rows}x{cols})")
    keys = list(class_names)
    if all(isinstance(key, int) for key in keys):  # one class per voxel: segment numbers in one array (small)
        lookup = np.zeros(max([*keys, int(labels.max(initial=0))]) + 1, dtype=np.uint16)
        lookup[keys] = np.arange(1, len(keys) + 1)
        segments = lookup[labels]
    else:  # regions overlap: one binary mask per segment
        segments = np.stack([np.isin(labels, key_values(key)) for key in keys], axis=-1).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="autoseg", version=__version__,
                                                   family=dcm_codes.cid7162.ArtificialIntelligence)
    codes = codes or {}
    descriptions = []
    for number, key in enumerate(keys, start=1):
        name = class_names[key]
        given = codes.get(name, {})
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=_concept(given.get("category", GENERIC_CATEGORY)),
            segmented_property_type=_concept(given.get("type", GENERIC_TYPE)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"autoseg {name}"[:64]))
    seg = hd.seg.Segmentation(
        source_images=list(series.datasets), pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=_series_number(series), sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="autoseg", manufacturer_model_name="autoseg",
        software_versions=__version__, device_serial_number="0", content_label="AUTOSEG",
        content_description=series_description[:64], series_description=series_description[:64],
        omit_empty_frames=bool(segments.any()))  # frames a segment leaves empty are left out (all: none kept)
    return _save(seg, path)


def _series_number(series: DicomSeries) -> int:
    number = series.datasets[0].get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") and 0 <= int(number) < 2**31 - 1001 else 1000


def _save(ds: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_seg(path: Path | str, series: DicomSeries) -> tuple[np.ndarray, dict[int, str]]:
    """The label map of SEG ``path`` on the grid of its source ``series`` (z, y, x) with segment numbers as
    values, and the segments' labels (number -> SegmentLabel). Overlapping segments (a region model's SEG)
    are refused with one line: a label map holds one class per voxel."""
    hd = require("highdicom")
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # noqa: BLE001  highdicom raises many kinds on a malformed object
        raise UserError(f"{path}: not a readable DICOM Segmentation ({reason(e)})") from e
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise UserError(f"{path}: references none of the slices of series {series.uid}")
    try:
        labels = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=False,
                                                   assert_missing_frames_are_empty=True, dtype=np.uint16)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: its segments cannot be read as one label map on series {series.uid} ({reason(e)})") from e
    return np.asarray(labels), names
