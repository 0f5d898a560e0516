"""Import a Medical Segmentation Decathlon (MSD) task into the nnU-Net v2 raw layout.

An MSD task folder (``Task04_Hippocampus/``) has a ``dataset.json`` with ``modality`` (index -> name),
``labels`` (value -> name), a ``training`` list of ``{"image": ..., "label": ...}`` paths and a ``test``
list; multi-channel images are one 4D NIfTI per case, channels last. autoseg (like nnU-Net) wants one 3D
file per channel: ``imagesTr/CASE_0000.nii.gz``, ``CASE_0001.nii.gz``... ::

    convert_msd("Task01_BrainTumour", "Dataset001_BrainTumour", jobs=8)

Everything is written into a hidden folder beside the destination and renamed into place at the end, so
an interrupted conversion never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.artifacts import check_writable, staged_folder
from autoseg.errors import UserError
from autoseg.io import Geometry, read_label, read_sitk, write_image, write_label
from autoseg.parallel import map_cases

ENDING = ".nii.gz"
_SOURCE_ENDINGS = (".nii.gz", ".nii")
_DESCRIPTIVE_KEYS = ("description", "reference", "licence", "release")


@dataclass(frozen=True)
class _CaseJob:
    """One case to convert: its MSD image (and label), and the destination folder's root."""

    case: str
    image: Path
    label: Path | None
    out: Path
    split: str  # "Tr" or "Ts"
    num_channels: int


def convert_msd(src: Path | str, dst: Path | str, jobs: int | None = None) -> Path:
    """Convert the MSD task folder ``src`` into a new nnU-Net v2 dataset folder ``dst``; return ``dst``.

    ``dst`` must not exist or be empty. Cases are converted in ``jobs`` processes (default: the CPU count).
    """
    src, dst = Path(src), Path(dst)
    _check_destination(dst)  # before anything is read: a destination we could not fill
    meta = _read_msd_json(src)
    where = src / "dataset.json"
    channel_names = _channel_names(meta, where)
    labels = _label_values(meta, where)
    train = _training_entries(meta, src, where)
    test = _test_entries(meta, src, where)
    _check_unique_cases([c for c, _, _ in train], where)
    _check_unique_cases([c for c, _ in test], where)
    _check_files_exist([p for _, image, label in train for p in (image, label)] + [p for _, p in test], where)

    with staged_folder(dst) as tmp:
        n = len(channel_names)
        work = [_CaseJob(c, image, label, tmp, "Tr", n) for c, image, label in train]
        work += [_CaseJob(c, image, None, tmp, "Ts", n) for c, image in test]
        for folder in {f"images{j.split}" for j in work} | {"labelsTr"}:
            (tmp / folder).mkdir()
        _run(_convert_case, work, jobs)
        _write_dataset_json(tmp / "dataset.json", meta, src, channel_names, labels, len(train))
    return dst


# --- reading the MSD dataset.json ------------------------------------------------------------------------


def _read_msd_json(src: Path) -> dict:
    path = src / "dataset.json"
    if not src.is_dir():
        raise UserError(f"{src}: MSD task folder not found")
    if not path.is_file():
        raise UserError(f"{path}: missing: an MSD task folder (e.g. Task04_Hippocampus) holds dataset.json")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise UserError(f"{path}: must hold a JSON object")
    missing = [k for k in ("modality", "labels", "training") if k not in meta]
    if missing:
        raise UserError(f"{path}: lacks the MSD key(s) {', '.join(repr(k) for k in missing)}")
    return meta


def _index_map(value: object, key: str, where: Path) -> list[tuple[int, str]]:
    """``{"0": "MRI", "1": ...}`` as sorted (index, name) pairs; indices must be 0, 1, ... without gaps."""
    if not isinstance(value, dict) or not value:
        raise UserError(f"{where}: '{key}' must be a non-empty object like {{\"0\": \"...\"}}")
    try:
        pairs = sorted((int(k), str(v)) for k, v in value.items())
    except ValueError as e:
        raise UserError(f"{where}: '{key}' keys must be integers, got {sorted(value)}") from e
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise UserError(f"{where}: '{key}' keys must be 0..{len(pairs) - 1}, got {[i for i, _ in pairs]}")
    return pairs


def _channel_names(meta: dict, where: Path) -> dict[str, str]:
    return {str(i): name for i, name in _index_map(meta["modality"], "modality", where)}


def _label_values(meta: dict, where: Path) -> dict[str, int]:
    """MSD maps value -> name; nnU-Net v2 maps name -> value."""
    pairs = _index_map(meta["labels"], "labels", where)
    names = [name for _, name in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{where}: label name(s) {', '.join(twice)} used for more than one value")
    return {name: i for i, name in pairs}


def _is_junk(entry: str) -> bool:
    """macOS resource-fork files ("._case.nii.gz") ride along in the official MSD tarballs."""
    return Path(entry).name.startswith("._")


def _case_id(path: Path, where: Path) -> str:
    for ending in _SOURCE_ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    raise UserError(f"{where}: {path.name} is not a NIfTI file (.nii.gz or .nii)")


def _training_entries(meta: dict, src: Path, where: Path) -> list[tuple[str, Path, Path]]:
    entries = meta["training"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"image", "label"} <= e.keys()
                                                 for e in entries):
        raise UserError(f"{where}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} objects")
    return [(_case_id(src / e["image"], where), src / e["image"], src / e["label"])
            for e in entries if not _is_junk(e["image"])]


def _test_entries(meta: dict, src: Path, where: Path) -> list[tuple[str, Path]]:
    """The ``test`` list; without one, whatever NIfTI files ``imagesTs/`` holds."""
    if "test" in meta:
        entries = meta["test"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise UserError(f"{where}: 'test' must be a list of image paths")
        paths = [src / e for e in entries if not _is_junk(e)]
    else:
        folder = src / "imagesTs"
        paths = sorted(p for p in folder.iterdir() if p.name.endswith(_SOURCE_ENDINGS) and not _is_junk(p.name)) \
            if folder.is_dir() else []
    return [(_case_id(p, where), p) for p in paths]


def _check_unique_cases(cases: Sequence[str], where: Path) -> None:
    twice = sorted({c for c in cases if cases.count(c) > 1})
    if twice:
        raise UserError(f"{where}: case(s) {', '.join(twice[:5])} listed more than once")


def _check_files_exist(paths: Sequence[Path], where: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]}: listed in {where} but not found{more}")


def _check_destination(dst: Path) -> None:
    """``dst`` must be new (or an empty folder) and its parent writable: the conversion is written beside it
    and renamed into place, so no existing file, an input least of all, is ever written over."""
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise UserError(f"{dst}: already exists and is not empty; choose a new folder or remove it")
    check_writable(dst.parent if dst.exists() else dst, folder=True, what="converted dataset")


# --- converting one case ---------------------------------------------------------------------------------


def _convert_case(job: _CaseJob) -> None:
    images = job.out / f"images{job.split}"
    if job.num_channels == 1 and _is_plain_3d_nifti_gz(job.image):
        shutil.copyfile(job.image, images / f"{job.case}_0000{ENDING}")  # already in shape: exact and fast
    else:
        channels = _split_channels(job.image)
        if len(channels) != job.num_channels:
            raise UserError(f"{job.image}: has {len(channels)} channel(s) but dataset.json 'modality' lists "
                            f"{job.num_channels}")
        for c, (array, geometry) in enumerate(channels):
            write_image(array, geometry, images / f"{job.case}_{c:04d}{ENDING}")
    if job.label is not None:
        _copy_label(job.label, job.out / "labelsTr" / f"{job.case}{ENDING}")


def _is_plain_3d_nifti_gz(path: Path) -> bool:
    """Whether the header says one 3D scalar volume (read without the voxels)."""
    if not path.name.endswith(ENDING):
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False  # the full read names the problem
    return reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1


def _split_channels(path: Path) -> list[tuple[np.ndarray, Geometry]]:
    """One (array, geometry) per channel of a 3D or 4D (channels last) NIfTI, in the file's own pixel type.

    SimpleITK reads an MSD 4D file as a 4D scalar image of size (x, y, z, c): the channels are its last axis,
    and its spacing, origin and direction hold the 3D ones in their first three entries (the 3x3 block).
    A NIfTI that stores channels as vector components reads as a 3D image with several components.
    """
    img = read_sitk(path)
    array = sitk.GetArrayFromImage(img)
    ndim, components = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if ndim == 3 and components == 1:
        return [(array, _geometry(img, 3))]
    if ndim == 3:
        return [(np.ascontiguousarray(array[..., c]), _geometry(img, 3)) for c in range(components)]
    if ndim == 4 and components == 1:
        geometry = _geometry(img, 3)
        return [(np.ascontiguousarray(a), geometry) for a in array]
    raise UserError(f"{path}: expected a 3D image or a 4D image with channels last, got a {ndim}D image "
                    f"with {components} component(s) per voxel")


def _geometry(img: sitk.Image, ndim: int) -> Geometry:
    """The geometry of the first ``ndim`` (spatial) axes of ``img``."""
    n = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(n, n)[:ndim, :ndim]
    return Geometry(tuple(float(s) for s in reversed(img.GetSpacing()[:ndim])),
                    tuple(float(o) for o in img.GetOrigin()[:ndim]),
                    tuple(float(d) for d in direction.ravel()))


def _copy_label(src: Path, dst: Path) -> None:
    """A ``.nii.gz`` label is copied byte for byte (exact, fast); anything else is read and rewritten."""
    if src.name.endswith(ENDING):
        shutil.copyfile(src, dst)
    else:
        write_label(*read_label(src), dst)


def _write_dataset_json(path: Path, meta: dict, src: Path, channel_names: dict[str, str],
                        labels: dict[str, int], num_training: int) -> None:
    out = {"name": str(meta.get("name") or src.name)}
    out.update({k: meta[k] for k in _DESCRIPTIVE_KEYS if k in meta})
    out.update({"channel_names": channel_names, "labels": labels, "numTraining": num_training,
                "file_ending": ENDING, "converted_from": f"Medical Segmentation Decathlon task {src.name}"})
    path.write_text(json.dumps(out, indent=2) + "\n")


# --- running cases in parallel ---------------------------------------------------------------------------


def _run(fn: Callable[[_CaseJob], None], work: Sequence[_CaseJob], jobs: int | None) -> None:
    """``fn`` on every item, in ``jobs`` processes; the first error stops the rest and is raised."""
    map_cases(fn, work, jobs or os.cpu_count() or 1, desc="convert")
