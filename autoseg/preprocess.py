"""Preprocessing: transpose, crop to nonzero, normalize, resample; and the cache of preprocessed cases.

One case goes through, in this order (nnU-Net v2's):

1. ``Plans.axis_order`` is applied to the spatial axes (coarsest axis first); 2D images ``(C, Y, X)`` get a
   leading axis of size 1 first, so every case in the cache has 3 spatial axes ``(C, Z, Y, X)``;
2. crop to the bounding box of the voxels nonzero in any channel;
3. normalize each channel (:mod:`autoseg.normalize`); with ``use_mask`` inside the hole-filled nonzero mask,
   and label voxels that are background *and* outside that mask become -1 (as in nnU-Net), so the loader
   can zero the image there after augmentation and then treat -1 as background;
4. resample to ``Configuration.spacing`` (:mod:`autoseg.resample`): all three axes for a 3D configuration,
   only axes 1 and 2 for a 2D one (axis 0 is the slice axis the 2D trainer samples);
5. sample up to :data:`MAX_CLASS_LOCATIONS` voxel coordinates per foreground label, seeded by the case id,
   for foreground oversampling.

The cache, per configuration, in ``WORKDIR/preprocessed/<configuration>/``::

    <case>.npy      float32 (C, Z, Y, X), memory-mappable: np.load(path, mmap_mode="r")
    <case>_seg.npy  int8 (int16/int32 when labels need it) (Z, Y, X); -1 = outside the nonzero mask
    <case>_inst.npy int32 (Z, Y, X) instance ids, only for datasets with instances (instancesTr or
                    ``instance_classes``): the label's transpose and crop, resampled with nearest neighbour
    <case>.json     written last, so its presence means the case is complete: crop box, shapes, spacing,
                    original geometry, class_locations, source_hash, config_hash

A case is up to date when its JSON names the same ``source_hash`` (content of its raw files, taken from
the fingerprint) and ``config_hash`` (spacing, normalization, resampling, axis order: what changes the
output). Every file is written to a temporary name and renamed, and the JSON of a case being recomputed
is removed first: a killed run leaves no file that a re-run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import (
    bounding_box_to_slice,
    get_bbox_from_mask,
    insert_crop_into_image,
)
from scipy.ndimage import binary_fill_holes

from autoseg import normalize as norm
from autoseg.artifacts import atomic_write_bytes, hash_files, header
from autoseg.dataset import Case, load_dataset
from autoseg.errors import UserError
from autoseg.fingerprint import case_files, case_instances, case_seed, map_cases
from autoseg.io import Geometry, read_images, read_label
from autoseg.resample import (
    present_values,
    resample_image,
    resample_label,
    resample_probabilities,
    resize,
    target_shape,
)
from autoseg.schema.fingerprint import ChannelStats, Fingerprint
from autoseg.schema.plans import Configuration, Plans
from autoseg.workdir import Workdir, case_paths, instance_path

CASE_ARTIFACT = "preprocessed_case"
FORMAT_VERSION = 1  # bump when the output of the same inputs changes: every cached case is recomputed
MAX_CLASS_LOCATIONS = 2000  # voxel coordinates kept per label and case for foreground oversampling


# --- one case ---------------------------------------------------------------------------------------


def axis_order3(axis_order: Sequence[int], ndim: int) -> list[int]:
    """``Plans.axis_order`` as a permutation of 3 axes (2D data gets its leading size-1 axis first)."""
    order = list(axis_order) or list(range(ndim))
    if ndim == 2 and len(order) == 2:
        order = [0, order[0] + 1, order[1] + 1]
    if sorted(order) != [0, 1, 2] or (ndim == 2 and order[0] != 0):
        raise UserError(f"plans.json: axis_order {list(axis_order)} is not a permutation of the {ndim} image axes")
    return order


def _to_three_axes(images: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], order: list[int]
                   ) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """(C, *spatial) -> (C, Z, Y, X) in ``order``; a 2D image's extra axis has a nominal spacing of 1."""
    if images.ndim == 3:
        images, spacing = images[:, None], [1.0, *spacing]
        label = None if label is None else label[None]
    images = images.transpose(0, *(a + 1 for a in order))
    label = None if label is None else label.transpose(order)
    return images, label, [float(spacing[a]) for a in order]


def _label_dtype(low: int, high: int) -> type:
    for dtype in (np.int8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    raise UserError(f"label values up to {high} are not supported")


def new_spacing(configuration: Configuration, spacing: Sequence[float]) -> list[float]:
    """The spacing a case is resampled to: all axes for 3D, axes 1 and 2 only for a 2D configuration."""
    if configuration.ndim == 3:
        return [float(s) for s in configuration.spacing]
    return [float(spacing[0]), *map(float, configuration.spacing)]


def class_locations(seg: np.ndarray, seed: int, ignore_label: int | None = None,
                    limit: int = MAX_CLASS_LOCATIONS) -> dict[str, list[list[int]]]:
    """Up to ``limit`` voxel coordinates of each foreground label present (label value as str -> [[z, y, x]]),
    drawn without replacement with ``seed``, so the loader can centre patches on rare classes cheaply."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in present_values(seg):
        if value <= 0 or value == ignore_label:
            continue
        where = np.flatnonzero(seg == value)
        pick = np.sort(rng.choice(where.size, min(limit, where.size), replace=False))
        out[str(value)] = np.stack(np.unravel_index(where[pick], seg.shape), axis=1).tolist()
    return out


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None, with_mask: bool
                    ) -> tuple[np.ndarray, np.ndarray | None, list[list[int]], np.ndarray | None]:
    """Crop (C, Z, Y, X) data and its label map to the box of voxels nonzero in any channel: scans carry
    large empty margins that would cost resampling, disk and training time. With ``with_mask`` also return
    the hole-filled nonzero mask and mark label background outside it -1 (nnU-Net's convention)."""
    nonzero = np.any(data != 0, axis=0)
    box = get_bbox_from_mask(nonzero)
    crop = bounding_box_to_slice(box)
    mask = binary_fill_holes(nonzero[crop]) if with_mask else None
    if seg is not None:
        seg = seg[crop].astype(_label_dtype(-1, int(seg.max(initial=0))))
        if mask is not None:
            seg[(seg == 0) & ~mask] = -1
    return data[(slice(None), *crop)], seg, box, mask


def preprocess_case(images: np.ndarray, geometry: Geometry, configuration: Configuration, plans: Plans,
                    channel_stats: Sequence[ChannelStats] | None = None, label: np.ndarray | None = None, *,
                    case_id: str = "", ignore_label: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one case held in memory: training cases (with ``label``) and images to predict (without).

    ``images`` is (C, *spatial) as :func:`autoseg.io.read_images` gives it; ``channel_stats`` (the
    fingerprint's) fills ``ct`` parameters the plan leaves out. Returns the float32 data (C, Z, Y, X), the
    label map (Z, Y, X) or None, and the properties :func:`restore_to_original` needs to go back.
    """
    nd = images.ndim - 1
    if configuration.ndim == 3 and nd == 2:
        raise UserError(f"plans.json: configuration '{configuration.name}' is 3D but the images are 2D")
    order = axis_order3(plans.axis_order, nd)
    data, seg, spacing = _to_three_axes(images, label, geometry.spacing, order)
    schemes = norm.resolve(configuration.normalization, channel_stats)
    shape_before_crop = list(data.shape[1:])
    data, seg, box, mask = crop_to_nonzero(data, seg, with_mask=any(s.use_mask for s in schemes))
    data = norm.normalize(data, schemes, mask)
    target = new_spacing(configuration, spacing)
    shape = target_shape(data.shape[1:], spacing, target)
    properties = {
        "shape_original": list(images.shape[1:]), "geometry": geometry.to_dict(), "axis_order": order,
        "shape_before_crop": shape_before_crop, "spacing_before_resampling": spacing, "crop_box": box,
        "shape_after_crop": list(data.shape[1:]), "shape_after_resampling": shape, "spacing": target,
        "masked": mask is not None,
    }
    data = resample_image(data, shape, configuration.resampling)
    if seg is not None:
        seg = resample_label(seg, shape, configuration.resampling)
        properties["class_locations"] = class_locations(seg, case_seed(case_id), ignore_label)
    return data, seg, properties


def preprocess_instances(instances: np.ndarray, properties: dict[str, Any], configuration: Configuration
                         ) -> np.ndarray:
    """A case's instance map (*spatial) brought to its preprocessed label's space: the same axis order and
    crop as the label (``properties`` from :func:`preprocess_case`), resampled with nearest neighbour (ids
    are not ordered, so no interpolation between them); int32."""
    inst = instances[None] if instances.ndim == 2 else instances
    inst = inst.transpose(properties["axis_order"])
    inst = inst[bounding_box_to_slice(properties["crop_box"])]
    shape = properties["shape_after_resampling"]
    if list(inst.shape) == list(shape):
        return np.ascontiguousarray(inst, np.int32)
    return resize(inst[None].astype(np.float32), shape, (0, 0, 0))[0].astype(np.int32)  # float32: ids < 2**24 exact


def restore_to_original(array: np.ndarray, properties: dict[str, Any], configuration: Configuration,
                        is_label: bool, fill: float | Sequence[float] | None = None) -> np.ndarray:
    """Bring a label map (Z, Y, X) or per-class maps (K, Z, Y, X) from preprocessed space to the original
    image's array: undo the resampling (labels one label at a time, maps linearly per class, the out-of-plane
    axis separately when configured), then the crop (outside it: ``fill``), then the axis order.

    ``fill`` defaults to 0 for labels and, for maps, to softmax background: 1 in channel 0, 0 elsewhere (when
    K > 1). Two ways to bound memory at the original size: argmax first and restore the label map (one
    volume at a time), or restore one class at a time (``array[c:c+1]``, ``fill=1.0 if c == 0 else 0.0``) and
    keep a running argmax; restoring all K maps at once holds K volumes. Pass ``fill=0.0`` for sigmoid
    (region) maps.
    """
    lead = 0 if is_label else 1
    expected = list(properties["shape_after_resampling"])
    if list(array.shape[lead:]) != expected:
        raise ValueError(f"array of spatial shape {list(array.shape[lead:])} is not in preprocessed space {expected}")
    shape = properties["shape_after_crop"]
    if is_label:
        cropped = resample_label(array, shape, configuration.resampling)
    else:
        cropped = resample_probabilities(array, shape, configuration.resampling)
    full = np.empty((*array.shape[:lead], *properties["shape_before_crop"]), cropped.dtype)
    full[...] = _fill_values(fill, is_label, array.shape[0])
    insert_crop_into_image(full, cropped, properties["crop_box"])
    order = properties["axis_order"]
    full = full.transpose(*range(lead), *(lead + a for a in np.argsort(order)))
    if len(properties["shape_original"]) == 2:
        full = full.reshape(*full.shape[:lead], *full.shape[lead + 1:])
    return np.ascontiguousarray(full)


def _fill_values(fill: float | Sequence[float] | None, is_label: bool, channels: int) -> Any:
    if fill is not None:
        return fill if is_label or np.isscalar(fill) else np.asarray(fill, np.float32).reshape(-1, 1, 1, 1)
    if is_label or channels == 1:
        return 0
    return np.array([1.0] + [0.0] * (channels - 1), np.float32).reshape(-1, 1, 1, 1)


# --- the cache ----------------------------------------------------------------------------------------


def config_hash(configuration: Configuration, plans: Plans, ignore_label: int | None = None,
                instance_classes: Sequence[int] | None = None) -> str:
    """Hash of what changes a configuration's preprocessed output; another value recomputes every case.
    ``instance_classes`` (datasets with instances) enters only when given: other datasets keep their hash.

    ``configuration.normalization`` should be resolved (:func:`autoseg.normalize.resolve`) first, so a
    changed dataset statistic counts too.
    """
    relevant = {"format": FORMAT_VERSION, "ndim": configuration.ndim, "spacing": configuration.spacing,
                "normalization": [asdict(n) for n in configuration.normalization],
                "resampling": asdict(configuration.resampling), "axis_order": plans.axis_order,
                "ignore_label": ignore_label, "max_class_locations": MAX_CLASS_LOCATIONS}
    if instance_classes is not None:
        relevant["instance_classes"] = list(instance_classes)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:32]


def _save_npy(array: np.ndarray, path: Path) -> None:
    """np.save to a temporary name in the same folder, then rename (no copy of the array in memory)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compact_json(record: dict) -> bytes:
    """One key per line, each value on its line: readable, and class_locations stay one line, not thousands."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(', ', ': '))}" for k, v in record.items()]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def write_properties(record: dict, path: Path) -> None:
    atomic_write_bytes(_compact_json(record), path)


def write_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray, record: dict,
               instances: np.ndarray | None = None) -> None:
    """Write a case's arrays, then its JSON last; an old JSON goes first so no stale one survives a crash."""
    data_path, seg_path, json_path = case_paths(folder, case_id)
    json_path.unlink(missing_ok=True)
    _save_npy(data.astype(np.float32, copy=False), data_path)
    _save_npy(seg, seg_path)
    if instances is not None:
        _save_npy(instances, instance_path(folder, case_id))
    write_properties(record, json_path)


def is_current(folder: Path, case_id: str, source_hash: str, chash: str, instances: bool = False) -> bool:
    """Whether the cached case was made from these files with this configuration and is whole (with its
    instance map when ``instances``)."""
    data_path, seg_path, json_path = case_paths(folder, case_id)
    try:
        record = json.loads(json_path.read_text())
        return (record.get("artifact") == CASE_ARTIFACT and record.get("source_hash") == source_hash
                and record.get("config_hash") == chash and seg_path.is_file()
                and (not instances or instance_path(folder, case_id).is_file())
                and list(np.load(data_path, mmap_mode="r").shape[1:]) == record["shape_after_resampling"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_stale(folder: Path, case_ids: set[str]) -> None:
    """Delete files of cases no longer in the dataset, and temporary files a killed run left behind."""
    keep = {p.name for cid in case_ids for p in (*case_paths(folder, cid), instance_path(folder, cid))}
    for p in folder.iterdir():
        temporary = p.name.startswith(".") and p.name.endswith(".tmp")
        ours = p.name.endswith((".npy", ".json"))
        if p.is_file() and (temporary or (ours and p.name not in keep)):
            p.unlink(missing_ok=True)


@dataclass
class _Job:
    """One case to (re)compute for one configuration; pickled to a worker process."""

    case: Case
    folder: Path
    configuration: Configuration  # normalization resolved
    plans: Plans
    source_hash: str
    config_hash: str
    ignore_label: int | None
    threads: int | None  # torch threads in a worker; None when running in the caller's process
    instance_classes: tuple[int, ...] | None = None  # None: the dataset has no instances (nothing cached)


def _run_job(job: _Job) -> str:
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    if job.case.label is None:
        raise UserError(f"{job.case.images[0]}: training case {job.case.id} has no label file")
    images, geometry = read_images(job.case.images)
    label, _ = read_label(job.case.label)
    if label.shape != images.shape[1:]:
        raise UserError(f"{job.case.label}: label shape {label.shape} differs from the image shape "
                        f"{images.shape[1:]}; run `autoseg validate` for details")
    instances = None
    if job.instance_classes is not None:
        instances = case_instances(job.case, label, job.instance_classes)
    data, seg, properties = preprocess_case(images, geometry, job.configuration, job.plans, label=label,
                                            case_id=job.case.id, ignore_label=job.ignore_label)
    if instances is not None:
        instances = preprocess_instances(instances, properties, job.configuration)
    record = {**header(CASE_ARTIFACT), "case": job.case.id, "configuration": job.configuration.name,
              "source_hash": job.source_hash, "config_hash": job.config_hash, **properties}
    write_case(job.folder, job.case.id, data, seg, record, instances)
    return job.configuration.name


def preprocess(dataset_dir: Path | str, workdir: Path | str, plans: Plans, fingerprint: Fingerprint,
               configurations: list[str] | None = None, jobs: int | None = None,
               progress: bool = False) -> dict[str, int]:
    """Fill ``WORKDIR/preprocessed/<configuration>/`` with every training case; return, per configuration,
    how many cases were (re)computed.

    Idempotent: a case is recomputed only when its files (the fingerprint's ``source_hash``), the parts of
    the configuration that shape the output, or its cached files changed; cases gone from the dataset are
    removed. The fingerprint must describe the dataset as it is now (``autoseg plan`` extracts it first);
    a case it does not list is hashed here. ``jobs`` worker processes (default: the CPU count), each with
    cpu_count // jobs torch threads. One run at a time per workdir: a run deletes temporary files it finds.
    """
    ds = load_dataset(dataset_dir)
    cases = ds.cases("Tr")
    names = configurations if configurations is not None else list(plans.configurations)
    unknown = [n for n in names if n not in plans.configurations]
    if unknown:
        raise UserError(f"plans.json has no configuration {', '.join(unknown)} "
                        f"(it has {', '.join(plans.configurations)})")
    jobs = jobs or os.cpu_count() or 1
    known = {c.id: c.source_hash for c in fingerprint.cases}
    hashes = {c.id: known.get(c.id) or hash_files([f for f in case_files(c) if f is not None]) for c in cases}
    instance_classes = tuple(ds.instance_classes) if ds.has_instances else None
    stale, counts = [], {}
    for name in names:
        folder = Workdir.of(workdir).preprocessed(name)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder, {c.id for c in cases})
        configuration = replace(plans.configurations[name], name=name, normalization=norm.resolve(
            plans.configurations[name].normalization, fingerprint.channels))
        chash = config_hash(configuration, plans, ds.ignore_label, instance_classes)
        todo = [c for c in cases if not is_current(folder, c.id, hashes[c.id], chash, instance_classes is not None)]
        counts[name] = len(todo)
        stale += [(c, folder, configuration, chash) for c in todo]
    workers = min(jobs, len(stale))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None  # no oversubscription
    work = [_Job(c, folder, cfg, plans, hashes[c.id], chash, ds.ignore_label, threads, instance_classes)
            for c, folder, cfg, chash in stale]
    map_cases(_run_job, work, jobs, progress, desc="preprocess")
    return counts
