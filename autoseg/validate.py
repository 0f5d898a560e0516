"""``autoseg validate``: find everything wrong with a raw dataset before any stage trusts it.

A bad file found during training costs hours and a geometry slip silently corrupts every prediction,
so this reads every case once and reports *all* problems, each one line naming the file and, where
it helps, the fix. Nothing here raises for bad input: problems are values (:class:`Problem`).

What is checked:

- ``dataset.json``: present, valid JSON, required keys, labels (background 0, consecutive), channel
  names, file ending (see :func:`autoseg.dataset.parse_dataset_json`);
- the layout: ``imagesTr``/``labelsTr`` present, at least one case, ``numTraining`` equal to the cases
  found, every file with the dataset's ending and ``CASE_XXXX`` naming, channel indices within
  ``channel_names``, no label without images;
- every case (training and ``imagesTs``), in parallel: each channel file present and readable, not
  truncated and not claiming more voxels than memory holds (both from the header, before the pixels are
  read: :func:`autoseg.io.read_sitk`), 2D or 3D, one channel per file, finite; channels and label of a case sharing shape and
  geometry (spacing, origin, direction, within :meth:`Geometry.mismatch`'s tolerance); label values
  integer and declared in ``dataset.json``;
- across cases: not a mix of 2D and 3D cases;
- instance datasets (:mod:`autoseg.schema.instances`): ``instance_classes`` naming single foreground labels;
  with ``instancesTr/``, each training case's instance map present, on the label's grid, integer and
  non-negative, with no id on background or on a class that is not an instance class, no id spanning two
  classes, and an id on every instance-class voxel.

Use::

    problems = validate_dataset("Dataset001_Liver", jobs=4)
    for p in problems:
        print(p)  # "<file>: <what is wrong>"
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from autoseg.dataset import _CHANNEL_RE, Case, Dataset, list_cases, parse_dataset_json
from autoseg.errors import Problem, UserError
from autoseg.io import SUPPORTED_ENDINGS, Geometry, file_ending, is_natural, read_image, read_label
from autoseg.parallel import is_small, map_cases
from autoseg.schema.instances import (
    INSTANCE_CLASSES_KEY,
    INSTANCE_FOLDERS,
    instance_class_problems,
    instance_classes,
)

__all__ = ["validate_dataset"]

#: Below this many cases a process pool costs more than it saves (so does a small dataset: workers.SMALL_BYTES).
POOL_MIN_CASES = 8
#: Data files that sit next to a header file and are not cases themselves.
_COMPANION_ENDINGS = {".mhd": (".raw", ".zraw")}
_MAX_LISTED_VALUES = 10


@dataclass(frozen=True)
class _Layout:
    """What files and cases are checked against; built even from a ``dataset.json`` with label problems."""

    root: Path
    channel_names: tuple[str, ...]
    file_ending: str
    label_values: tuple[int, ...] | None  # None: labels unusable, values are not checked
    num_training: int | None  # None: numTraining unusable, the count is not checked
    instance_values: tuple[tuple[int, str], ...] = ()  # the instance classes (value, name)
    instances: Path | None = None  # instancesTr/ when the dataset has it and declares instance classes


@dataclass
class _CaseReport:
    """What one case contributes: its problems, and its dimensionality for the cross-case check."""

    problems: list[Problem]
    ndim: int | None = None
    first_file: Path | None = None


def validate_dataset(root: Path | str, jobs: int | None = None, progress: bool = False) -> list[Problem]:
    """Check a dataset in the nnU-Net v2 raw layout and return every problem found (empty: it is fine).

    Order is deterministic: ``dataset.json``, then the layout (sorted by file), then case by case
    (training, then ``imagesTs``), then problems across cases. Cases are read one file at a time,
    in ``jobs`` processes (default: the CPU count) when there are enough of them to pay off.
    """
    root = Path(root)
    ds, problems = parse_dataset_json(root)
    layout = _layout_of(ds) if ds is not None else _layout_despite_problems(root)
    if layout is None:
        return problems
    instance_problems, layout = _instance_layout(layout)
    problems += instance_problems
    train = list_cases(root / "imagesTr", layout.file_ending, len(layout.channel_names), root / "labelsTr")
    test = list_cases(root / "imagesTs", layout.file_ending, len(layout.channel_names), None)
    problems += _check_layout(layout, len(train))
    if not (root / "labelsTr").is_dir():  # reported once above, not once per case
        train = [replace(c, label=None) for c in train]
    cases = train + test
    reports = _map_cases(partial(_check_case, layout=layout), cases, jobs, progress)
    for report in reports:
        problems += report.problems
    problems += _check_dimensionality_mix(reports)
    return problems


# --- dataset.json --------------------------------------------------------------------------------------


def _layout_of(ds: Dataset) -> _Layout:
    return _Layout(ds.root, tuple(ds.channel_names), ds.file_ending, tuple(ds.label_values), ds.num_training)


def _layout_despite_problems(root: Path) -> _Layout | None:
    """A layout from a ``dataset.json`` that has problems but still says which files to expect.

    Its problems are already reported; with channel names and file ending usable, the files can be
    checked too, so that one run shows everything.
    """
    try:
        raw = json.loads((root / "dataset.json").read_text())
        channels, ending = raw["channel_names"], raw["file_ending"]
        order = sorted(channels, key=int) if isinstance(channels, dict) else []
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not order or [int(k) for k in order] != list(range(len(order))):
        return None
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        return None
    n = raw.get("numTraining")
    num_training = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
    return _Layout(root, tuple(str(channels[k]) for k in order), ending.lower(),
                   _declared_values(raw.get("labels")), num_training)


def _declared_values(labels: object) -> tuple[int, ...] | None:
    """The values a ``labels`` entry allows (regions: their union; background 0 always), None when unusable."""
    if not isinstance(labels, dict) or not labels:
        return None
    values: set[int] = {0}
    for v in labels.values():
        items = v if isinstance(v, list) else [v]
        if not items or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            return None
        values.update(items)
    return tuple(sorted(values))


# --- layout: folders, file names, counts ---------------------------------------------------------------


def _check_layout(layout: _Layout, num_cases: int) -> list[Problem]:
    """Problems visible from file names alone: folders, endings, naming, channel indices, orphans, counts."""
    root, ending = layout.root, layout.file_ending
    images, labels = root / "imagesTr", root / "labelsTr"
    problems = []
    if not images.is_dir():
        problems.append(_at(images, "missing: training images go in imagesTr/ as CASE_XXXX" + ending))
    if not labels.is_dir():
        problems.append(_at(labels, "missing: training labels go in labelsTr/ as CASE" + ending))
    if images.is_dir() and num_cases == 0:
        problems.append(_at(images, f"no training cases found: expected files like CASE_0000{ending}"))
    n = layout.num_training
    if n is not None and num_cases and n != num_cases:
        problems.append(_at(root / "dataset.json", f"'numTraining' is {n} but imagesTr holds {num_cases} case(s); "
                                                   f"set it to {num_cases}"))
    file_problems, image_ids = _check_image_files(images, layout)
    file_problems += _check_image_files(root / "imagesTs", layout)[0]
    if images.is_dir():  # without imagesTr every label would be an orphan: the missing folder says it
        file_problems += _check_label_files(labels, layout, image_ids)
    if layout.instances is not None and images.is_dir():
        file_problems += _check_label_files(layout.instances, layout, image_ids, kind="instance map")
    return problems + sorted(file_problems, key=lambda p: p.where)


def _entries(folder: Path) -> list[tuple[Path, str, str]]:
    """Visible files of ``folder`` as (path, stem, ending), ``.nii.gz`` counting as one ending."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        end = file_ending(p)
        if p.name.lower().endswith(end):  # file_ending lower-cases; keep the name's own spelling
            end = p.name[len(p.name) - len(end):]
        out.append((p, p.name[: len(p.name) - len(end)] if end else p.name, end))
    return out


def _ending_problem(path: Path, end: str, layout: _Layout) -> Problem | None:
    if end == layout.file_ending or end.lower() in _COMPANION_ENDINGS.get(layout.file_ending, ()):
        return None
    shown = end or "(none)"
    return _at(path, f"ending {shown} differs from file_ending {layout.file_ending} in dataset.json; "
                     f"convert the file or move it out of {path.parent.name}/")


def _check_image_files(folder: Path, layout: _Layout) -> tuple[list[Problem], set[str]]:
    """Endings, ``CASE_XXXX`` naming and channel indices in an images folder; also the case ids seen."""
    problems, ids = [], set()
    for path, stem, end in _entries(folder):
        m = _CHANNEL_RE.match(stem)
        if m and end.lower() in SUPPORTED_ENDINGS:
            ids.add(m["case"])
        bad_ending = _ending_problem(path, end, layout)
        if bad_ending is not None:
            problems.append(bad_ending)
        elif end != layout.file_ending:  # a companion data file
            continue
        elif not m:
            problems.append(_at(path, f"name does not follow CASE_XXXX{layout.file_ending} (a case id, '_', "
                                      "a 4-digit channel index), so it is ignored; rename it"))
        elif int(m["channel"]) >= len(layout.channel_names):
            problems.append(_at(path, f"channel index {int(m['channel'])} but dataset.json declares "
                                      f"{len(layout.channel_names)} channel(s) in 'channel_names'"))
    return problems, ids


def _check_label_files(folder: Path, layout: _Layout, image_ids: set[str], kind: str = "label") -> list[Problem]:
    """Endings in labelsTr (or instancesTr), and files whose case has no image file in imagesTr."""
    problems = []
    for path, stem, end in _entries(folder):
        bad_ending = _ending_problem(path, end, layout)
        if bad_ending is not None:
            problems.append(bad_ending)
        elif end == layout.file_ending and stem not in image_ids:
            problems.append(_at(path, f"{kind} without images: no {stem}_0000{layout.file_ending} in "
                                      f"imagesTr; add the images or remove the {kind}"))
    return problems


# --- one case ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    """The case's first readable channel: the others and the label must agree with it."""

    path: Path
    shape: tuple[int, ...]
    geometry: Geometry


def _check_case(case: Case, layout: _Layout) -> _CaseReport:
    """Read the case's files one at a time and report everything wrong with them."""
    report = _CaseReport([])
    ref: _Reference | None = None
    channels_read, missing = 0, []
    for path in case.images:
        if not path.is_file():
            missing.append(path)
            continue
        loaded = _read(path, read_image, report.problems)
        if loaded is None:
            continue
        arr, geometry = loaded
        channels_read += arr.shape[0]
        report.problems += _image_problems(path, arr)
        shape = arr.shape[1:]
        del arr, loaded  # the next channel is read without this one in memory
        if len(shape) not in (2, 3):  # reported above; nothing to compare it with
            continue
        if ref is None:
            ref = _Reference(path, shape, geometry)
            report.ndim, report.first_file = len(shape), path
        else:
            report.problems += _agreement_problems(path, shape, geometry, ref)
    report.problems += _missing_channel_problems(case, missing, channels_read, layout)
    if case.label is not None:
        report.problems += _check_label(case, ref, layout)
    report.problems.sort(key=lambda p: p.where)  # file order; a file's own problems keep their order
    return report


def _read(path: Path, reader: Callable, problems: list[Problem]) -> tuple[np.ndarray, Geometry] | None:
    """Read with ``reader``; an unreadable or truncated file becomes a problem instead."""
    try:
        return reader(path)
    except UserError as e:
        message = str(e).splitlines()[0] if str(e) else "cannot read"
        problems.append(_at(path, message.removeprefix(f"{path}: ")))
        return None


def _image_problems(path: Path, arr: np.ndarray) -> list[Problem]:
    """Dimensionality, one channel per file, finite values."""
    problems = []
    ndim = arr.ndim - 1
    if ndim not in (2, 3):
        problems.append(_at(path, f"is {ndim}D {_shape(arr.shape[1:])}; images must be 2D or 3D with one "
                                  "file per channel (split a 4D file into CASE_0000, CASE_0001, ...)"))
    if arr.shape[0] > 1 and not is_natural(path):
        problems.append(_at(path, f"holds {arr.shape[0]} values per voxel (a vector image); "
                                  "write each channel to its own CASE_XXXX file"))
    nan, inf = _count_nonfinite(arr)
    note = ""
    if not nan and not inf and file_ending(path) in (".nii", ".nii.gz"):
        nan, inf = nifti_stored_nonfinite(path)
        note = ", which the NIfTI reader silently turns into 0"
    if nan or inf:
        problems.append(_at(path, f"holds {nan} NaN and {inf} Inf voxel(s){note}; replace them with "
                                  "finite values"))
    return problems


def _count_nonfinite(arr: np.ndarray) -> tuple[int, int]:
    finite = np.isfinite(arr)
    if finite.all():
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(arr)))
    return nan, arr.size - int(np.count_nonzero(finite)) - nan


def nifti_stored_nonfinite(path: Path) -> tuple[int, int]:
    """NaN and Inf counts among a float NIfTI file's stored voxels.

    ITK's NIfTI reader replaces them with 0, so the array read cannot show them; the stored data is
    streamed (a few MB at a time) and counted instead. Integer files cannot hold them and are skipped.
    """
    gz = file_ending(path) == ".nii.gz"
    nan = inf = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            stored = _nifti_float_data(f.read(540))
            if stored is None:
                return 0, 0
            dtype, offset = stored
            f.seek(offset)
            while chunk := f.read(1 << 22):
                a = np.frombuffer(chunk, dtype, count=len(chunk) // dtype.itemsize)
                n, i = _count_nonfinite(a)
                nan, inf = nan + n, inf + i
    except (OSError, EOFError, zlib.error, ValueError):  # a broken file: its read has said so already
        return 0, 0
    return nan, inf


def _nifti_float_data(head: bytes) -> tuple[np.dtype, int] | None:
    """(voxel dtype, data offset) of a NIfTI-1/-2 header whose voxels are float32/float64, else None."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            datatype = struct.unpack(order + "h", head[70:72])[0]
            offset = struct.unpack(order + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype = struct.unpack(order + "h", head[12:14])[0]
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        kind = {16: "f4", 64: "f8"}.get(datatype)
        return (np.dtype(order + kind), max(int(offset), 348)) if kind else None
    return None


def _agreement_problems(path: Path, shape: tuple[int, ...], geometry: Geometry,
                        ref: _Reference) -> list[Problem]:
    """A channel or label must lie on the same voxel grid as the case's first channel."""
    if shape != ref.shape:
        return [_at(path, f"shape {_shape(shape)} differs from {_shape(ref.shape)} of {ref.path.name}")]
    detail = geometry.mismatch(ref.geometry)
    if detail is not None:
        return [_at(path, f"geometry differs from {ref.path.name} beyond tolerance: {detail} "
                          "(this file vs that one); resample it or copy that file's geometry")]
    return []


def _missing_channel_problems(case: Case, missing: list[Path], channels_read: int,
                              layout: _Layout) -> list[Problem]:
    """Name each missing channel file, except where natural images carry several channels (RGB) in one file."""
    expected = len(layout.channel_names)
    present = [p for p in case.images if p not in missing]
    if is_natural(case.images[0]):
        if channels_read > expected:
            return [_at(present[0], f"case {case.id} holds {channels_read} channels but dataset.json "
                                    f"declares {expected} in 'channel_names'")]
        if channels_read == expected and list(case.images[: len(present)]) == present:
            return []  # e.g. one RGB file for channels R, G, B
    return [_at(p, f"missing: channel {i} ('{layout.channel_names[i]}') of case {case.id}{_sibling_hint(p)}")
            for i, p in enumerate(case.images) if p in missing]


def _check_label(case: Case, ref: _Reference | None, layout: _Layout) -> list[Problem]:
    """The label: present, readable, integer, on the image's grid, with declared values only."""
    path = case.label
    assert path is not None
    if not path.is_file():
        return [_at(path, f"missing: label of case {case.id}{_sibling_hint(path)}")]
    problems: list[Problem] = []
    loaded = _read(path, read_label, problems)
    if loaded is None:
        return problems
    seg, geometry = loaded
    if seg.ndim not in (2, 3):
        problems.append(_at(path, f"is {seg.ndim}D {_shape(seg.shape)}; label maps must be 2D or 3D"))
    elif ref is not None:
        problems += _agreement_problems(path, seg.shape, geometry, ref)
    if layout.label_values is not None:
        undeclared = sorted(set(_values(seg)) - set(layout.label_values))
        if undeclared:
            problems.append(_at(path, f"holds label value(s) {_list(undeclared)} not declared in dataset.json "
                                      f"'labels' (declared: {_list(layout.label_values)})"))
    if layout.instances is not None and seg.ndim in (2, 3):
        problems += _check_instances(case, seg, geometry, layout)
    return problems


# --- instances -----------------------------------------------------------------------------------------


def _instance_layout(layout: _Layout) -> tuple[list[Problem], _Layout]:
    """The ``instance_classes`` problems of dataset.json, and the layout with the instance classes and folder."""
    where = layout.root / "dataset.json"
    try:
        raw = json.loads(where.read_text())
    except (OSError, ValueError):  # reported by parse_dataset_json
        return [], layout
    if not isinstance(raw, dict):
        return [], layout
    folder = layout.root / INSTANCE_FOLDERS["Tr"]
    if INSTANCE_CLASSES_KEY not in raw:
        if folder.is_dir():
            return [_at(folder, f"instance maps but dataset.json has no '{INSTANCE_CLASSES_KEY}'; name the "
                                "classes whose objects are instances there")], layout
        return [], layout
    labels = raw.get("labels") if isinstance(raw.get("labels"), dict) else {}
    problems = [_at(where, m) for m in instance_class_problems(labels, raw[INSTANCE_CLASSES_KEY])]
    values = tuple(sorted(instance_classes(raw).items()))
    return problems, replace(layout, instance_values=values, instances=folder if folder.is_dir() else None)


def _check_instances(case: Case, seg: np.ndarray, geometry: Geometry, layout: _Layout) -> list[Problem]:
    """One case's instance map against its label map: the rules of :mod:`autoseg.schema.instances`."""
    assert layout.instances is not None and case.label is not None
    path = layout.instances / case.label.name
    if not path.is_file():
        return [_at(path, f"missing: instance map of case {case.id} (instancesTr/ must hold one per label)"
                          f"{_sibling_hint(path)}")]
    problems: list[Problem] = []
    loaded = _read(path, read_label, problems)
    if loaded is None:
        return problems
    ids, inst_geometry = loaded
    if ids.shape != seg.shape:
        return [_at(path, f"shape {_shape(ids.shape)} differs from {_shape(seg.shape)} of its label "
                          f"{case.label.name}")]
    detail = inst_geometry.mismatch(geometry)
    if detail is not None:
        return [_at(path, f"geometry differs from its label {case.label.name} beyond tolerance: {detail}")]
    if ids.min(initial=0) < 0:
        return [_at(path, "holds negative instance ids; ids are 0 (none) or 1..N")]
    names = dict(layout.instance_values)
    on = ids > 0
    labelled = seg[on].astype(np.int64)
    background = np.unique(ids[on][labelled == 0])
    if background.size:
        problems.append(_at(path, f"instance id(s) {_list(background.tolist())} lie on background voxels "
                                  f"(label 0) of {case.label.name}"))
    other = on & (seg != 0) & ~np.isin(seg, list(names))
    if other.any():
        values = np.unique(seg[other]).tolist()
        problems.append(_at(path, f"instance id(s) {_list(np.unique(ids[other]).tolist())} lie on label(s) "
                                  f"{_list(values)}, which dataset.json does not list in '{INSTANCE_CLASSES_KEY}'"))
    base = int(seg.max(initial=0)) + 1
    keys = np.unique(ids[on].astype(np.int64) * base + labelled)  # one key per (id, label) pair present
    pairs = np.stack([keys // base, keys % base])
    pairs = pairs[:, pairs[1] != 0]
    ids_seen, counts = np.unique(pairs[0], return_counts=True)
    for i in ids_seen[counts > 1][:_MAX_LISTED_VALUES]:
        spanned = pairs[1, pairs[0] == i].tolist()
        problems.append(_at(path, f"instance {int(i)} spans labels {_list(spanned)}; one instance has one class"))
    missing = np.isin(seg, list(names)) & ~on
    if missing.any():
        classes = ", ".join(f"'{names[int(v)]}'" for v in np.unique(seg[missing]))
        problems.append(_at(path, f"{int(missing.sum())} voxel(s) of instance class(es) {classes} have no "
                                  "instance id"))
    return problems


def _values(seg: np.ndarray) -> list[int]:
    """The distinct values of a label map.

    Counting beats sorting for the usual small label ranges; counting a few million voxels at a time
    keeps bincount's int64 copy small next to a large uint8 map.
    """
    top = int(seg.max(initial=0))
    if top >= 65536:
        return np.unique(seg).tolist()
    seen = np.zeros(top + 1, bool)
    flat = seg.reshape(-1)
    for start in range(0, flat.size, 1 << 22):
        seen |= np.bincount(flat[start:start + (1 << 22)], minlength=top + 1) > 0
    return np.flatnonzero(seen).tolist()


def _sibling_hint(path: Path) -> str:
    """When the expected file is missing but one with the same name and another ending exists, say so."""
    stem = path.name[: len(path.name) - len(file_ending(path))]
    for other in sorted(path.parent.glob(glob.escape(stem) + ".*")):
        if other.name != path.name and other.name[: len(other.name) - len(file_ending(other))] == stem:
            return f" ({other.name} is there: convert or rename it to {path.name})"
    return ""


def _at(where: Path, message: str) -> Problem:
    return Problem(str(where), message)


def _list(values: Sequence[int]) -> str:
    """``1, 2, 3``, cut after a few values: a line names the problem, it does not dump the data."""
    more = ", ..." if len(values) > _MAX_LISTED_VALUES else ""
    return ", ".join(map(str, values[:_MAX_LISTED_VALUES])) + more


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# --- across cases --------------------------------------------------------------------------------------


def _check_dimensionality_mix(reports: list[_CaseReport]) -> list[Problem]:
    """A dataset is all 2D or all 3D; name the cases that differ from the majority (ties: the first case)."""
    dims = Counter(r.ndim for r in reports if r.ndim in (2, 3))
    if len(dims) < 2:
        return []
    major = dims.most_common(1)[0][0]
    return [_at(r.first_file, f"is {r.ndim}D but {dims[major]} case(s) are {major}D; a dataset must not "
                              "mix 2D and 3D cases")
            for r in reports if r.ndim in (2, 3) and r.ndim != major]


def _map_cases(fn: Callable[[Case], _CaseReport], cases: list[Case], jobs: int | None,
               progress: bool) -> list[_CaseReport]:
    """``fn`` over cases in order; in a process pool when it pays off. The result never depends on the pool."""
    jobs = jobs or os.cpu_count() or 1
    if len(cases) <= POOL_MIN_CASES or is_small(cases):
        jobs = 1
    return map_cases(fn, cases, jobs, progress, desc="validate", fallback=True)

