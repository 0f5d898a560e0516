"""Training batches: patches sampled from the preprocessed cache, augmented, made in background workers.

A batch is a pure function of ``(seed, step)``: :meth:`BatchMaker.make` derives every random choice (which
cases, where the patches are, which augmentation) from a generator seeded by both. A training run killed
at step 1200 and resumed there sees exactly the batches an uninterrupted run would have seen, whatever the
number of workers. :class:`PatchLoader` runs ``make(start_step), make(start_step + 1), ...`` in worker
processes, in order, and hands out torch tensors::

    maker = BatchMaker(workdir / "preprocessed" / "3d_fullres", train_ids, configuration, seed=0)
    with PatchLoader(maker, start_step=step) as batches:
        for step, batch in zip(range(step, steps), batches):
            loss = train_step(batch["data"], batch["target"])

Sampling is nnU-Net's: cases uniformly with replacement; a patch is cut from a region enlarged for rotation
and zoom (:func:`autoseg.augment.region_size`), padded where the image is smaller (image 0, label -1); a
share ``sampling.foreground_fraction`` of each batch is centred on a voxel of a class present in the case,
the class drawn with probability proportional to ``sampling.class_weights`` (so rare classes are not
starved). Classes are label values, also for a region dataset: every region is a union of values, so the
smallest region's values are drawn by their own weights, and the target stays the integer label map (the
loss makes the region masks). 2D configurations cut 2D patches from one slice (axis 0) of the 3D cache. The target has label
-1 (outside the nonzero mask, padding) mapped to background 0; the ignore label passes through as is.

A cache with instance maps (``<case>_inst.npy``, datasets with instances) adds ``"instances"`` (B, *patch) int32
to each batch: cut from the same region and carried through the same spatial transform as the label (a second
label channel, nearest neighbour), so ids stay on the objects the label shows. A configuration with the
touching-object formulation (``instances.method`` "watershed") also gets ``"interior"`` (B, *patch) float32, the
target of its extra output (:func:`autoseg.instances.interior_map` of the augmented instance patch).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset, Sampler

from autoseg.augment import build_transforms, region_size
from autoseg.errors import UserError
from autoseg.instances import contact_zone, interior_map
from autoseg.schema.plans import Configuration

OPEN_CASES = 64  # memory-mapped cases kept open per process


@dataclass
class CaseIndex:
    """What sampling needs to know about a cached case without reading its arrays."""

    case_id: str
    data_path: Path
    seg_path: Path
    shape: tuple[int, int, int]  # (Z, Y, X)
    locations: dict[int, np.ndarray]  # foreground label -> (N, 3) voxel coordinates
    instance_path: Path | None = None  # the cached instance map, where the dataset has instances


def read_case_index(folder: Path, case_id: str, ignore_label: int | None = None) -> CaseIndex:
    """A case's shape and class locations from its JSON (the ignore label is never a class to oversample)."""
    # here: workers need not import image I/O (SimpleITK
    from autoseg.workdir import case_paths, instance_path

    data_path, seg_path, json_path = case_paths(folder, case_id)
    inst_path = instance_path(folder, case_id)
    try:
        record = json.loads(json_path.read_text())
        shape = tuple(int(s) for s in record["shape_after_resampling"])
        raw = record.get("class_locations", {})
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{json_path}: not a readable preprocessed case ({e}); run `autoseg plan` again") from e
    locations = {int(k): np.asarray(v, np.int32).reshape(-1, 3) for k, v in raw.items()
                 if len(v) and int(k) != ignore_label}
    return CaseIndex(case_id, data_path, seg_path, shape, locations,  # type: ignore[arg-type]
                     inst_path if inst_path.is_file() else None)


def derive_seeds(seed: int, step: int) -> tuple[np.random.Generator, int]:
    """A generator for sampling and a 32-bit seed for np.random (batchgenerators), both from (seed, step)."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    sampling, augmentation = np.random.SeedSequence([seed, step]).spawn(2)
    return np.random.default_rng(sampling), int(augmentation.generate_state(1)[0])


@contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed np.random and Python's random (batchgenerators draws from both) for one batch, and put the
    caller's states back afterwards: making a batch in the training process leaves its randomness alone."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def forced_foreground(batch_size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Which samples of a batch are centred on foreground: the last round(B * fraction), at least one when
    fraction > 0 (nnU-Net's rule, which for small batches never oversamples). A batch of one is forced with
    probability ``fraction``, so the share over many steps is still ``fraction``."""
    forced = np.zeros(batch_size, bool)
    if fraction <= 0:
        return forced
    if batch_size == 1:
        forced[0] = rng.random() < fraction
        return forced
    n = min(batch_size, max(1, round(batch_size * fraction)))
    forced[batch_size - n:] = True
    return forced


def lower_bounds(shape: Sequence[int], region: Sequence[int], patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Range of the region's lower corner, per axis, so that the centred patch can reach every image border
    and the region is centred on the image where the image is smaller than the patch (nnU-Net's get_bbox)."""
    shape, region, patch = (np.asarray(x, int) for x in (shape, region, patch))
    need = region - patch
    need = np.where(need + shape < region, region - shape, need)
    low = -(need // 2)
    high = shape + need // 2 + need % 2 - region
    return low, np.maximum(low, high)


def read_region(array: np.ndarray, lower: Sequence[int], out: np.ndarray) -> None:
    """Copy the part of ``array[..., lower:lower + out.shape]`` (trailing spatial axes) that lies inside the
    array into ``out``, which holds the padding value elsewhere; only that part is read from a memory map."""
    n = len(lower)
    src, dst = [], []
    for lo, size, extent in zip(lower, out.shape[-n:], array.shape[-n:]):
        a, b = max(lo, 0), min(lo + size, extent)
        if b <= a:
            return
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(..., *dst)] = array[(..., *src)]


class BatchMaker:
    """Makes batch number ``step`` of a training run, the same every time: {"data": float32 (B, C, *patch),
    "target": int16 (int64 for label values past 32767) (B, *patch)}.

    ``folder`` is a configuration's cache (``WORKDIR/preprocessed/<config>``); ``augment=False`` gives
    plain patches (same sampling) for validation or measurement. Cheap to pickle to worker processes: it
    holds class locations, not images; regions are read through memory maps, the last
    :data:`OPEN_CASES` cases' kept open (not all: a thousand cases would exhaust a worker's descriptors).
    The cache must not be rewritten while a maker reads it; make a new one after preprocessing again.
    """

    def __init__(self, folder: Path | str, case_ids: Sequence[str], configuration: Configuration, seed: int,
                 ignore_label: int | None = None, *, augment: bool = True):
        if not case_ids:
            raise UserError(f"{folder}: no training cases given to the loader")
        self.folder = Path(folder)
        self.cases = [read_case_index(self.folder, cid, ignore_label) for cid in case_ids]
        self.patch_size = [int(p) for p in configuration.patch_size]
        self.ndim = configuration.ndim
        self.batch_size = configuration.batch_size
        self.sampling = configuration.sampling
        self.seed = seed
        augmentation = configuration.augmentation if augment else None
        self.region = region_size(self.patch_size, augmentation, self.ndim) if augmentation else self.patch_size
        masked = [i for i, n in enumerate(configuration.normalization) if n.use_mask]
        self.transforms = build_transforms(augmentation, self.patch_size, self.ndim, masked)
        labels = [label for case in self.cases for label in case.locations] + [ignore_label or 0]
        small = max(labels) <= np.iinfo(np.int16).max
        self.target_dtype, self._seg_dtype = (np.int16, np.int16) if small else (np.int64, np.int32)
        self.instances = all(case.instance_path is not None for case in self.cases)
        if self.instances:
            self._seg_dtype = np.int32  # the label and the instance ids travel as one array
        self.interior = configuration.instances.method == "watershed"
        self.contact_weight = float(configuration.instances.contact_weight)
        if self.interior and not self.instances:
            raise UserError(f"{self.folder}: the plan trains an interior output (instances.method 'watershed') but "
                            "the cache holds no instance maps; run `autoseg plan` again on the dataset with instances")
        self.spacing = [float(s) for s in configuration.spacing]
        self.channels = int(np.load(self.cases[0].data_path, mmap_mode="r").shape[0])
        self._maps: OrderedDict[str, tuple[np.ndarray, ...]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict()}  # each process maps the files itself

    def _open(self, case: CaseIndex) -> tuple[np.ndarray, ...]:
        """The case's memory maps (data, label[, instances]), from a small per-process cache (opening costs
        ~0.3 ms per file)."""
        if case.case_id in self._maps:
            self._maps.move_to_end(case.case_id)
        else:
            paths = [case.data_path, case.seg_path, *([case.instance_path] if self.instances else [])]
            self._maps[case.case_id] = tuple(np.load(p, mmap_mode="r") for p in paths)
            if len(self._maps) > OPEN_CASES:
                self._maps.popitem(last=False)
        return self._maps[case.case_id]

    def make(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step``: cut the regions with a generator seeded by (seed, step), then augment them
        with the global random states seeded from the same pair."""
        rng, legacy_seed = derive_seeds(self.seed, step)
        picks = rng.integers(len(self.cases), size=self.batch_size)
        forced = forced_foreground(self.batch_size, self.sampling.foreground_fraction, rng)
        data = np.zeros((self.batch_size, self.channels, *self.region), np.float32)
        seg = np.full((self.batch_size, 2 if self.instances else 1, *self.region), -1, self._seg_dtype)
        for b, (pick, fg) in enumerate(zip(picks, forced)):
            self._cut(self.cases[pick], bool(fg), rng, data[b], seg[b])
        with seeded_global_random(legacy_seed):
            batch = self.transforms(data=data, seg=seg)
        out = {"data": np.ascontiguousarray(batch["data"], np.float32),
               "target": np.ascontiguousarray(batch["seg"][:, 0]).astype(self.target_dtype)}
        if self.instances:
            out["instances"] = np.ascontiguousarray(batch["seg"][:, 1]).astype(np.int32)
        if self.interior:
            out["interior"] = np.stack([interior_map(i, self.spacing) for i in out["instances"]])
            if self.contact_weight:
                out["interior_weight"] = 1.0 + self.contact_weight * np.stack(
                    [contact_zone(i) for i in out["instances"]]).astype(np.float32)
        return out

    def _cut(self, case: CaseIndex, foreground: bool, rng: np.random.Generator,
             data_out: np.ndarray, seg_out: np.ndarray) -> None:
        """Read one region of a case into the batch arrays (already filled with the padding values); ``seg_out``
        is (1 or 2, *region): the label and, with instances, the instance map."""
        centre = self._foreground_voxel(case, rng) if foreground else None
        spatial = case.shape[-self.ndim:]
        low, high = lower_bounds(spatial, self.region, self.patch_size)
        if centre is None:
            lower = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]
        else:
            half = np.asarray(self.region) // 2
            lower = np.clip(np.asarray(centre[-self.ndim:]) - half, low, high).tolist()
        data, *labels = self._open(case)
        if self.ndim == 2:  # one slice of the 3D cache: the foreground voxel's, or a random one
            z = int(centre[0]) if centre is not None else int(rng.integers(case.shape[0]))
            data, labels = data[:, z], [a[z] for a in labels]
        read_region(data, lower, data_out)
        for array, out in zip(labels, seg_out):
            read_region(array, lower, out)

    def _foreground_voxel(self, case: CaseIndex, rng: np.random.Generator) -> np.ndarray | None:
        """A voxel of a class present in the case, the class drawn by ``sampling.class_weights`` (label
        value as str -> weight; 1 when missing; all zero -> uniform); None when the case has no foreground."""
        labels = sorted(case.locations)
        if not labels:
            return None
        weights = np.array([float(self.sampling.class_weights.get(str(v), 1.0)) for v in labels])
        weights = np.where(weights > 0, weights, 0.0)
        p = weights / weights.sum() if weights.sum() > 0 else None
        coords = case.locations[labels[int(rng.choice(len(labels), p=p))]]
        return coords[int(rng.integers(len(coords)))]


# --- background workers --------------------------------------------------------------------------------


def default_workers() -> int:
    """Worker processes for the loader: all CPUs this process may use but one (for the training loop),
    at least 1, at most 8 (more rarely helps and each holds its own batches)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


class MakesBatches(Protocol):
    """Anything with ``make(step)``: a :class:`BatchMaker`, or a wrapper (e.g. one that picks a DDP rank's
    share of the sequence)."""

    def make(self, step: int) -> dict[str, np.ndarray]: ...


class _Steps(Sampler[int]):
    """start, start + 1, ... without end: the dataset index is the step."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _StepDataset(Dataset):
    def __init__(self, maker: MakesBatches):
        self.maker = maker

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self.maker.make(step)


def _init_worker(_: int) -> None:
    """One thread per worker for torch and BLAS: workers share the CPUs with the training loop and each
    other, and oversubscribed BLAS made the coordinate rotation ~10x slower on 2 busy cores."""
    torch.set_num_threads(1)
    threadpool_limits(limits=1)


class PatchLoader:
    """Iterator over ``maker.make(start_step)``, ``make(start_step + 1)``, ... as torch tensors, made ahead
    by ``num_workers`` processes (``prefetch`` batches each) and delivered in order; pinned when
    ``pin_memory`` (default: when CUDA is available; a run on the CPU says False, since pinning then only adds
    a thread and a CUDA context to this process). ``num_workers=0`` makes them in this process (tests,
    debugging). Close it (or use ``with``) to stop the workers; ``step`` is the step of the next batch."""

    def __init__(self, maker: MakesBatches, start_step: int = 0, num_workers: int | None = None,
                 prefetch: int = 2, pin_memory: bool | None = None):
        workers = default_workers() if num_workers is None else num_workers
        self.step = start_step
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._loader = DataLoader(
            _StepDataset(maker), batch_size=None, sampler=_Steps(start_step), num_workers=workers,
            persistent_workers=workers > 0, pin_memory=pin,
            prefetch_factor=prefetch if workers > 0 else None, worker_init_fn=_init_worker if workers > 0 else None)
        self._iter: Iterator | None = iter(self._loader)

    def __iter__(self) -> PatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            raise StopIteration
        batch = next(self._iter)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes and wait until they have exited (torch terminates any still busy after a
        few seconds), now: not whenever the last reference to the iterator goes. A run that ends in an
        exception raised inside the loader keeps the iterator in the traceback, and its workers must not live
        on into the next run (a search's next trial). Batches already handed out stay valid."""
        it, self._iter = self._iter, None
        self._loader = None  # type: ignore[assignment]
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own teardown; absent without workers
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_loader(maker: MakesBatches, steps: int = 10, start_step: int = 0) -> float:
    """Seconds one process takes to make a batch (mean over ``steps``, after one warm-up batch that opens
    the memory maps), with one BLAS thread as in a worker. With W workers the loader keeps up when this / W
    is below the training step time."""
    with threadpool_limits(limits=1):
        maker.make(start_step)
        start = time.perf_counter()
        for step in range(start_step + 1, start_step + 1 + steps):
            maker.make(step)
        return (time.perf_counter() - start) / steps
