"""Fingerprint: what the planner needs to know about a dataset, extracted once.

Per case: spacing, shape, nonzero crop; per channel: foreground intensity statistics; per class: how
often it is present, its volume, its connected components and its extent in mm — the label statistics
that nnU-Net does not collect but that patch size, sampling and post-processing depend on.

Extraction reads each case once in a worker process and sends back only a :class:`CaseFingerprint` and a
small intensity sample, so memory stays at about one case per worker. The result does not depend on the
number of workers: every random draw is seeded from the case id and results are ordered by case id.

>>> fp = extract_fingerprint("Dataset001_Liver", jobs=4)     # doctest: +SKIP
>>> fp.save("autoseg_work/Dataset001_Liver/fingerprint.json")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cc3d
import numpy as np

from autoseg.artifacts import hash_files
from autoseg.dataset import Case, Dataset, load_dataset
from autoseg.errors import DatasetError, Problem, UserError
from autoseg.instances import instance_stats, instances_from_labels
from autoseg.io import read_images, read_label
from autoseg.parallel import is_small, map_cases
from autoseg.schema.fingerprint import CaseFingerprint, ChannelStats, ClassStats, Fingerprint

SAMPLES_PER_CASE = 10_000  # foreground intensities drawn per case and channel (with replacement, as nnU-Net)


def modality_of(channel_name: str) -> str:
    """Modality from a channel name as nnU-Net reads it: 'CT' anywhere in the name means CT."""
    name = channel_name.strip()
    return "CT" if name.upper() == "CT" or name.upper().startswith("CT") else name.upper()


# --- one case: runs in a worker process; only small results travel back -----------------------------


def case_seed(case_id: str) -> int:
    """A seed from the case id alone: a case draws the same sample whichever worker reads it, in any order."""
    return int.from_bytes(hashlib.blake2b(case_id.encode(), digest_size=8).digest(), "little")


def _projections(mask: np.ndarray) -> list[np.ndarray]:
    """Per axis, whether each slice holds a set voxel; two passes over the volume whatever its dimensions."""
    first = mask.any(axis=tuple(range(1, mask.ndim)))
    if mask.ndim == 1:
        return [first]
    return [first, *_projections(mask.any(axis=0))]


def mask_box(mask: np.ndarray) -> list[list[int]] | None:
    """``[start, stop)`` per axis of the set voxels of ``mask``; None when none is set."""
    box = []
    for hits in _projections(mask):
        idx = np.flatnonzero(hits)
        if idx.size == 0:
            return None
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def _slices(box: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def nonzero_box(images: np.ndarray) -> list[list[int]]:
    """``[start, stop)`` per spatial axis of the voxels nonzero in any channel; the whole image if none is.

    nnU-Net fills holes in the mask first; filling holes never changes a bounding box, so this skips it.
    """
    mask = images[0] != 0
    for channel in images[1:]:
        mask |= channel != 0
    return mask_box(mask) or [[0, size] for size in mask.shape]


def foreground_sample(images: np.ndarray, label: np.ndarray, ignore_label: int | None, count: int,
                      seed: int) -> np.ndarray:
    """``(C, count)`` intensities at foreground voxels (label > 0, not ignore), drawn with replacement.

    Every case contributes the same number of values, as in nnU-Net, so large cases do not dominate the
    dataset's statistics; ``(C, 0)`` when the case has no foreground.
    """
    fg = label > 0
    if ignore_label is not None:
        fg &= label != ignore_label
    where = np.flatnonzero(fg)
    if where.size == 0:
        return np.zeros((images.shape[0], 0), np.float32)
    pick = np.sort(where[np.random.default_rng(seed).integers(0, where.size, count)])
    return images.reshape(images.shape[0], -1)[:, pick]


def _value_stats(label: np.ndarray) -> dict[int, tuple[int, tuple[slice, ...], list[float]]]:
    """Voxel count, bounding box and centroid (voxel indices) of every value present, in one pass
    (cc3d.statistics)."""
    if int(label.max(initial=0)) < label.size:  # cc3d's limit: values below the voxel count
        stats = cc3d.statistics(label)
        return {v: (int(n), stats["bounding_boxes"][v], [float(x) for x in stats["centroids"][v]])
                for v, n in enumerate(stats["voxel_counts"]) if n}
    found = {}
    for v in np.unique(label).tolist():
        mask = label == v
        found[v] = (int(mask.sum()), _slices(mask_box(mask)), [float(ix.mean()) for ix in np.nonzero(mask)])
    return found


def _relative(centroid: Sequence[float], start: Sequence[int], shape: Sequence[int]) -> list[float]:
    """A centroid found in a crop starting at ``start`` as a share of the whole array per axis: voxel ``i``
    stands at ``(i + 0.5) / n``, so a flip along an axis maps ``x`` to ``1 - x`` exactly."""
    return [round((a + c + 0.5) / n, 4) for c, a, n in zip(centroid, start, shape)]


def class_centroids(label: np.ndarray, ignore_label: int | None = None) -> dict[str, list[float]]:
    """Per label value present (not background, not ignore), its centroid as a share of the array per axis
    (:func:`_relative`): the fingerprint's ``class_centroid`` and what the quality flag's position check
    measures on a prediction, the same way."""
    labelled = mask_box(label > 0)
    if labelled is None:
        return {}
    stats = _value_stats(np.ascontiguousarray(label[_slices(labelled)]))
    return {str(v): _relative(centroid, [a for a, _ in labelled], label.shape)
            for v, (_, _, centroid) in sorted(stats.items()) if v not in (0, ignore_label)}


@dataclass
class ClassFacts:
    """One case's label statistics, per label value (as str): what :class:`CaseFingerprint` keeps of them."""

    voxels: dict[str, int] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)
    extents: dict[str, list[float]] = field(default_factory=dict)  # bbox size in mm per axis
    centers: dict[str, list[float]] = field(default_factory=dict)  # bbox centre / shape per axis
    centroids: dict[str, list[float]] = field(default_factory=dict)  # :func:`_relative` centroid per axis


def class_stats(label: np.ndarray, spacing: Sequence[float], ignore_label: int | None) -> ClassFacts:
    """Per label value present (not background, not ignore): voxels, connected components, bbox extent in mm,
    bbox centre and centroid as a share of the image per axis.

    Works inside the bounding box of all labelled voxels (a tenth of a CT volume, typically): ten times
    less to scan. Components use full connectivity (26 in 3D, 8 in 2D), each inside its value's box.
    """
    labelled = mask_box(label > 0)
    facts = ClassFacts()
    if labelled is None:
        return facts
    shape, start = label.shape, [a for a, _ in labelled]
    label = np.ascontiguousarray(label[_slices(labelled)])
    connectivity = 26 if label.ndim == 3 else 8
    for value, (count, box, centroid) in sorted(_value_stats(label).items()):
        if value == 0 or value == ignore_label:
            continue
        key = str(value)
        facts.voxels[key] = count
        facts.components[key] = int(cc3d.connected_components(label[box] == value, connectivity=connectivity,
                                                              return_N=True)[1])
        facts.extents[key] = [round((s.stop - s.start) * float(sp), 6) for s, sp in zip(box, spacing)]
        facts.centers[key] = [round((a + (s.start + s.stop) / 2) / n, 4) for s, a, n in zip(box, start, shape)]
        facts.centroids[key] = _relative(centroid, start, shape)
    return facts


def case_instances(case: Case, label: np.ndarray, instance_classes: Sequence[int]) -> np.ndarray:
    """A training case's instance map: its ``instancesTr`` file, or the connected components of the instance
    classes in its label map (int32, the label's shape; a mismatch is a user error naming the file)."""
    if case.instances is None:
        return instances_from_labels(label, instance_classes)
    if not case.instances.is_file():
        raise UserError(f"{case.instances}: missing: instancesTr needs one instance map per training case; "
                        "run `autoseg validate` for details")
    inst, _ = read_label(case.instances)
    if inst.shape != label.shape:
        raise UserError(f"{case.instances}: instance map shape {inst.shape} differs from the label shape "
                        f"{label.shape}; run `autoseg validate` for details")
    return inst.astype(np.int32, copy=False)


def case_files(case: Case) -> list:
    """The files a training case is made of (hashed: a change in any of them recomputes the case)."""
    return [*case.images, case.label, *([case.instances] if case.instances is not None else [])]


def analyze_case(case: Case, ignore_label: int | None = None, samples: int = SAMPLES_PER_CASE,
                 instance_classes: Sequence[int] = ()) -> tuple[CaseFingerprint, np.ndarray]:
    """Fingerprint one case and draw its foreground intensity sample; the images are dropped on return.
    With ``instance_classes`` (or an instance file) also the sizes of its instances and how many touch."""
    if case.label is None:
        raise UserError(f"{case.images[0]}: training case {case.id} has no label file")
    images, geometry = read_images(case.images)
    label, _ = read_label(case.label)
    if label.shape != images.shape[1:]:
        raise UserError(f"{case.label}: label shape {label.shape} differs from the image shape "
                        f"{images.shape[1:]}; run `autoseg validate` for details")
    crop = nonzero_box(images)
    sample = foreground_sample(images, label, ignore_label, samples, case_seed(case.id))
    del images
    facts = class_stats(label, geometry.spacing, ignore_label)
    sizes, touching = {}, {}
    if instance_classes or case.instances is not None:
        stats = instance_stats(case_instances(case, label, instance_classes), label, instance_classes)
        sizes = {str(v): s.sizes for v, s in stats.items() if s.sizes}
        touching = {str(v): s.touching for v, s in stats.items() if s.sizes}
    fp = CaseFingerprint(id=case.id, spacing=[float(s) for s in geometry.spacing], shape=list(label.shape),
                         cropped_shape=[b - a for a, b in crop], crop_box=crop,
                         source_hash=hash_files(case_files(case)), class_voxels=facts.voxels,
                         class_components=facts.components, class_extent_mm=facts.extents,
                         class_center=facts.centers, class_centroid=facts.centroids,
                         instance_voxels=sizes, instance_touching=touching)
    return fp, sample


def _analyze_job(job: tuple[Case, int | None, int, tuple[int, ...]]) -> tuple[CaseFingerprint, np.ndarray]:
    return analyze_case(*job)


# --- running cases in parallel -------------------------------------------------------------------------

# --- the dataset: aggregation --------------------------------------------------------------------------


def channel_stats(name: str, sample: np.ndarray) -> ChannelStats:
    """Statistics of one channel's pooled foreground sample (float64 arithmetic, plain floats out)."""
    s = sample.astype(np.float64)
    p_lo, median, p_hi = np.percentile(s, (0.5, 50.0, 99.5))
    return ChannelStats(name=name, modality=modality_of(name), mean=float(s.mean()), std=float(s.std()),
                        median=float(median), min=float(s.min()), max=float(s.max()),
                        percentile_00_5=float(p_lo), percentile_99_5=float(p_hi))


def _spread(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"median": 0.0, "p5": 0.0, "p95": 0.0}
    median, p5, p95 = np.percentile(np.asarray(values, np.float64), (50.0, 5.0, 95.0))
    return {"median": round(float(median), 6), "p5": round(float(p5), 6), "p95": round(float(p95), 6)}


def _per_axis(extents: np.ndarray, q: float) -> list[float]:
    """Percentile ``q`` of each axis of ``(cases, ndim)`` extents; zeros when there are no cases."""
    if len(extents) == 0:
        return [0.0] * extents.shape[1]
    return [round(float(v), 6) for v in np.percentile(extents, q, axis=0)]


def instance_summary(key: str, cases: Sequence[CaseFingerprint]) -> dict:
    """An instance class over the dataset: instances per case (where present), their sizes (pooled over the
    cases) and the share of them touching another instance; {} for a class that is not an instance class."""
    holding = [c for c in cases if key in c.instance_voxels]
    if not holding:
        return {}
    sizes = [s for c in holding for s in c.instance_voxels[key]]
    mm3 = [s * float(np.prod(c.spacing)) for c in holding for s in c.instance_voxels[key]]
    counts = [len(c.instance_voxels[key]) for c in holding]
    touching = sum(c.instance_touching.get(key, 0) for c in holding)
    return {"per_case": {"median": float(np.median(counts)), "max": float(max(counts))},
            "voxels": _spread(sizes), "volume_mm3": _spread(mm3),
            "touching_share": round(touching / len(sizes), 4) if sizes else 0.0}


def class_summary(value: int, name: str, cases: Sequence[CaseFingerprint], ndim: int) -> ClassStats:
    """One class over the dataset; volume, components and extent are taken over the cases where it is present."""
    key = str(value)
    present = [c for c in cases if c.class_voxels.get(key, 0) > 0]
    voxels = [c.class_voxels[key] for c in present]
    mm3 = [c.class_voxels[key] * float(np.prod(c.spacing)) for c in present]
    comps = [c.class_components[key] for c in present]
    extents = np.array([c.class_extent_mm[key] for c in present], np.float64).reshape(-1, ndim)
    centers = np.array([c.class_center[key] for c in present if key in c.class_center], np.float64).reshape(-1, ndim)
    return ClassStats(
        value=value, name=name, cases_present=len(present),
        volume_voxels=_spread(voxels), volume_mm3=_spread(mm3),
        components_per_case={"median": float(np.median(comps)) if comps else 0.0,
                             "max": float(max(comps, default=0))},
        extent_mm={"median": _per_axis(extents, 50.0), "p95": _per_axis(extents, 95.0)},
        center={"p10": _per_axis(centers, 10.0), "p90": _per_axis(centers, 90.0)} if len(centers) else {},
        instances=instance_summary(key, cases),
    )


def dataset_classes(ds: Dataset, cases: Sequence[CaseFingerprint]) -> dict[int, str]:
    """Classes to summarise: the declared ones; for region datasets, every integer value declared or found."""
    if not ds.has_regions:
        return dict(sorted(ds.classes.items()))
    names = {v: k for k, v in ds.labels.items() if isinstance(v, int)}
    values = set(ds.label_values) | {int(k) for c in cases for k in c.class_voxels}
    values -= {0, ds.ignore_label}
    return {v: names.get(v, f"label_{v}") for v in sorted(values)}


def dataset_hash(ds: Dataset, cases: Sequence[CaseFingerprint]) -> str:
    """Hash of dataset.json and of every case's id and content: changes when any input changes."""
    h = hashlib.blake2b(digest_size=16)
    h.update((ds.root / "dataset.json").read_bytes())
    for c in cases:
        h.update(f"\0{c.id}:{c.source_hash}".encode())
    return h.hexdigest()


def _median_int(values: np.ndarray) -> list[int]:
    return [int(np.floor(m + 0.5)) for m in np.median(values, axis=0)]


def _check_consistent(cases: Sequence[CaseFingerprint], samples: Sequence[np.ndarray], ds: Dataset) -> None:
    problems = []
    ndim = len(cases[0].shape)
    for c, s in zip(cases, samples):
        if len(c.shape) != ndim:
            problems.append(Problem(c.id, f"is {len(c.shape)}D while {cases[0].id} is {ndim}D"))
        if s.shape[0] != ds.num_channels:
            problems.append(Problem(c.id, f"has {s.shape[0]} image channel(s), dataset.json names {ds.num_channels}"))
    if not any(s.shape[1] for s in samples):
        problems.append(Problem(str(ds.root / "labelsTr"), "no training case has any foreground label"))
    if problems:
        raise DatasetError(problems)


def extract_fingerprint(dataset: Path | str, jobs: int | None = None, progress: bool = False) -> Fingerprint:
    """Read every training case of ``dataset`` (nnU-Net v2 layout) and summarise what planning needs.

    ``jobs`` worker processes (default: the CPU count) read cases in parallel; the result is identical for
    any ``jobs``. Bad input raises :class:`UserError` naming the file.
    """
    ds = load_dataset(dataset)
    cases = ds.cases("Tr")
    if not cases:
        raise DatasetError([Problem(str(ds.root / "imagesTr"), "no training cases found (expected CASE_0000"
                                                               f"{ds.file_ending} files)")])
    jobs = 1 if is_small(cases) else jobs or os.cpu_count() or 1
    instance_classes = tuple(ds.instance_classes)
    results = map_cases(_analyze_job, [(c, ds.ignore_label, SAMPLES_PER_CASE, instance_classes) for c in cases],
                        jobs, progress, desc="fingerprint")
    fps = [fp for fp, _ in results]
    samples = [s for _, s in results]
    _check_consistent(fps, samples, ds)
    ndim = len(fps[0].shape)
    pooled = np.concatenate(samples, axis=1)
    median_spacing = [float(v) for v in np.median(np.array([c.spacing for c in fps]), axis=0)]
    return Fingerprint(
        dataset_name=ds.name, dataset_hash=dataset_hash(ds, fps), ndim=ndim,
        channel_names=list(ds.channel_names), labels=dict(ds.labels), file_ending=ds.file_ending,
        cases=fps,
        channels=[channel_stats(name, pooled[i]) for i, name in enumerate(ds.channel_names)],
        classes=[class_summary(v, n, fps, ndim) for v, n in dataset_classes(ds, fps).items()],
        median_spacing=median_spacing,
        median_shape=_median_int(np.array([c.shape for c in fps])),
        median_cropped_shape=_median_int(np.array([c.cropped_shape for c in fps])),
        anisotropy_ratio=round(max(median_spacing) / min(median_spacing), 6),
        regions_class_order=list(ds.regions_class_order or []) if ds.has_regions else [],
        instance_classes=list(ds.instance_classes.values()),
    )
