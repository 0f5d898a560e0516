"""``autoseg convert-dicom SRC DST``: a folder of DICOM studies whose labels are SEG or RTSTRUCT objects becomes
a dataset in the nnU-Net v2 layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``), validated before it is
put in place.

Each label object is one case: the image series it references (found anywhere under SRC by its
SeriesInstanceUID) is ``imagesTr/CASE_0000.nii.gz`` and its segments, on that series' grid, are
``labelsTr/CASE.nii.gz``. Classes are the segments' labels (SEG SegmentLabel, RTSTRUCT ROI names), one value
each in the order they are first met (cases sorted by patient, then file), so one tool's exports keep their
numbering. Cases are named after the PatientID (``_2``, ``_3``... when a patient has several). Image series
without a label object are left out (counted in the result).

Everything is written into a hidden folder beside DST, validated (:func:`autoseg.validate.validate_dataset`)
and renamed into place: a failed or interrupted conversion leaves nothing that looks like a dataset.

>>> convert_dicom("exports/", "Dataset010_Liver")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from autoseg.artifacts import check_writable, staged_folder
from autoseg.dicom import require
from autoseg.dicom.series import DicomFolder, DicomObject, DicomSeries, find_series, reason
from autoseg.errors import DatasetError, Problem, UserError
from autoseg.io import Geometry, write_image, write_label

ENDING = ".nii.gz"
LABEL_MODALITIES = ("SEG", "RTSTRUCT")
CHANNEL_NAME = {"CT": "CT", "MR": "MRI", "PT": "PET"}  # "CT" selects the CT normalization


@dataclass
class ConvertedDicom:
    """What :func:`convert_dicom` wrote: the dataset folder, its cases (id -> label object), classes (name ->
    value) and the image series left out for want of a label object."""

    dataset: Path
    cases: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        classes = ", ".join(f"{v} {k}" for k, v in self.labels.items())
        left = f"; {len(self.unlabelled)} image series without labels left out" if self.unlabelled else ""
        return f"wrote {self.dataset}: {len(self.cases)} case(s), labels {classes}{left}"


def referenced_series(ds: Any, path: Path) -> str:
    """The SeriesInstanceUID a SEG or RTSTRUCT object segments, or one line saying it names none."""
    try:
        if ds.Modality == "SEG":
            return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        frame = ds.ReferencedFrameOfReferenceSequence[0]
        return str(frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: a {ds.Modality} object that references no image series ({reason(e)})") from e


def _labels_of(obj: DicomObject, series: DicomSeries) -> tuple[np.ndarray, dict[int, str]]:
    """(label map on the series' grid with the object's own numbers, number -> name)."""
    if obj.modality == "SEG":
        from autoseg.dicom.seg import read_seg

        return read_seg(obj.path, series)
    try:
        from autoseg.dicom.rtstruct import read_rtstruct
    except ImportError as e:
        raise UserError(f"{obj.path}: an RT Structure Set; this autoseg cannot read them "
                        "(no autoseg.dicom.rtstruct); export the labels as SEG") from e
    pydicom = require("pydicom")
    ds = pydicom.dcmread(obj.path)
    rois = [str(roi.ROIName) for roi in ds.get("StructureSetROISequence", [])]
    twice = sorted({n for n in rois if rois.count(n) > 1})
    if twice:
        raise UserError(f"{obj.path}: ROI name(s) {', '.join(twice)} used twice; a class needs one name")
    values = {name: k for k, name in enumerate(rois, start=1)}
    return sitk.GetArrayFromImage(read_rtstruct(ds, series, values)), {k: n for n, k in values.items()}


def _case_ids(pairs: list[tuple[DicomObject, DicomSeries]]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for _, series in pairs:
        base = re.sub(r"[^\w.-]+", "_", str(series.datasets[0].get("PatientID", "")).strip()).strip("_") or "case"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return ids


def _pairs(found: DicomFolder) -> list[tuple[DicomObject, DicomSeries]]:
    pydicom = require("pydicom")
    pairs, used = [], {}
    for obj in found.objects:
        if obj.modality not in LABEL_MODALITIES:
            continue
        uid = referenced_series(pydicom.dcmread(obj.path, stop_before_pixels=True), obj.path)
        series = found.by_uid(uid)
        if series is None:
            raise UserError(f"{obj.path}: its image series {uid} is not under {found.root}")
        if uid in used:
            raise UserError(f"{obj.path}: series {uid} is labelled twice (also by {used[uid]}); keep one label "
                            "object per series")
        used[uid] = obj.path
        pairs.append((obj, series))
    if not pairs:
        raise UserError(f"{found.root}: no SEG or RTSTRUCT object found; convert-dicom needs labelled series")
    return sorted(pairs, key=lambda p: (str(p[1].datasets[0].get("PatientID", "")), str(p[0].path)))


def _check_destination(dst: Path) -> None:
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise UserError(f"{dst}: already exists and is not empty; choose a new folder or remove it")
    check_writable(dst.parent if dst.exists() else dst, folder=True, what="converted dataset")


def _geometry(img: sitk.Image) -> Geometry:
    return Geometry(tuple(float(s) for s in reversed(img.GetSpacing())), tuple(img.GetOrigin()),
                    tuple(img.GetDirection()))


def convert_dicom(src: Path | str, dst: Path | str, jobs: int | None = None) -> ConvertedDicom:
    """Convert the DICOM studies under ``src`` into a new nnU-Net v2 dataset folder ``dst`` (new or empty).
    ``jobs``: worker processes of the validation."""
    from autoseg.validate import validate_dataset

    src, dst = Path(src), Path(dst)
    _check_destination(dst)
    found = find_series(src)
    pairs = _pairs(found)
    modalities = sorted({series.modality for _, series in pairs})
    if len(modalities) > 1:
        first = {m: next(o.path for o, s in pairs if s.modality == m) for m in modalities}
        raise UserError(f"{src}: labelled series of several modalities ({', '.join(f'{m} in {p}' for m, p in first.items())}); "
                        "a dataset takes one kind of image: convert them separately")
    result = ConvertedDicom(dst, unlabelled=[s.uid for s in found.series if s.uid not in {p[1].uid for p in pairs}])
    with staged_folder(dst) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for cid, (obj, series) in zip(_case_ids(pairs), pairs):
            labels, names = _labels_of(obj, series)
            values = np.zeros(max([*names, int(labels.max(initial=0))]) + 1, dtype=np.uint16)
            for number in sorted(names):
                values[number] = result.labels.setdefault(names[number], len(result.labels) + 1)
            unnamed = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
            if unnamed:
                raise UserError(f"{obj.path}: segment number(s) {unnamed} hold voxels but are not described")
            image = series.image
            geometry = _geometry(image)
            write_image(sitk.GetArrayFromImage(image), geometry, tmp / "imagesTr" / f"{cid}_0000{ENDING}")
            write_label(values[labels], geometry, tmp / "labelsTr" / f"{cid}{ENDING}")
            result.cases[cid] = obj.path
        meta = {"name": dst.name, "channel_names": {"0": CHANNEL_NAME.get(modalities[0], modalities[0])},
                "labels": {"background": 0, **result.labels}, "numTraining": len(result.cases),
                "file_ending": ENDING, "converted_from": f"DICOM studies in {src}"}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        problems = validate_dataset(tmp, jobs=jobs or 1)
        if problems:
            raise DatasetError([Problem(p.where.replace(str(tmp), str(dst)), p.message) for p in problems])
    return result
