"""The rule toolbox planners compose: spacing, axis order, topology, patch, normalization, sampling.

Each rule is a small pure function of fingerprint numbers, so it can be tested on made-up fingerprints
and reused by any planner. Spatial lists are in array axis order (after ``axis_order`` where noted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.labels import regions_of
from autoseg.schema.plans import (
    Augmentation,
    Instances,
    Network,
    Normalization,
    Optimizer,
    Resampling,
    Sampling,
)

ANISOTROPY_THRESHOLD = 3.0
SMALL_CLASS_SHARE = 0.01  # a class whose typical object fills less than this share of a patch is small
TOUCHING_SHARE = 0.05  # instances touching another at least this often: the touching-object formulation
CONTACT_WEIGHT = 10.0  # interior loss weight where objects meet: the original U-Net paper's separation weight w0
ADAMW_LR = 3e-3  # 3x Adam's usual 1e-3: a small class learned from ~half the steps (lesions.md); 3e-4 never


# --- spacing and axis order -------------------------------------------------------------------------

def target_spacing(fp: Fingerprint) -> list[float]:
    """Median spacing; on an axis more than 3x coarser than the others (and with few voxels there), the
    10th percentile instead, so thin-slice cases are not thrown away by resampling to the median."""
    spacings = np.array([c.spacing for c in fp.cases], float)
    shapes = np.array([c.cropped_shape for c in fp.cases], float)
    target = np.median(spacings, 0)
    if len(target) < 3:
        return target.tolist()
    size = np.median(shapes, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[others])
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, max(target[others]) + 1e-5)
    return [float(s) for s in target]


def axis_order(spacing: list[float]) -> list[int]:
    """Coarsest axis first (it is the one 2D configurations slice along); otherwise keep the order."""
    if len(spacing) < 3:
        return list(range(len(spacing)))
    worst = int(np.argmax(spacing))
    if spacing[worst] <= min(spacing) * (1 + 1e-6):  # isotropic: nothing to move
        return list(range(len(spacing)))
    return [worst] + [i for i in range(len(spacing)) if i != worst]


def permute(values: list, order: list[int]) -> list:
    return [values[i] for i in order]


def resampled_shape(shape: list[int], spacing: list[float], target: list[float]) -> list[int]:
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


def median_resampled_shape(fp: Fingerprint, target: list[float], order: list[int]) -> list[int]:
    """Median over cases of the cropped shape after resampling, in axis order ``order``."""
    shapes = [resampled_shape(permute(c.cropped_shape, order), permute(c.spacing, order), target) for c in fp.cases]
    return [int(v) for v in np.median(np.array(shapes), 0)]


# --- topology -----------------------------------------------------------------------------------------

@dataclass
class Topology:
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    patch_size: list[int]  # rounded up to a multiple of the total stride

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def divisor(self) -> list[int]:
        d = [1] * len(self.patch_size)
        for s in self.strides:
            d = [a * b for a, b in zip(d, s)]
        return d


def topology(spacing: list[float], patch: list[int], min_size: int = 4, max_stages: int = 7) -> Topology:
    """Pool an axis only while its (current) spacing is within 2x of the finest and its feature map stays
    >= ``min_size`` after pooling; 3-kernels only on axes within 2x of the finest spacing (1 on coarser
    axes, until pooling the fine axes brings them within range)."""
    ndim = len(spacing)
    cur_spacing, cur_size = list(spacing), [float(p) for p in patch]
    kernel = [1] * ndim
    kernels, strides = [], [[1] * ndim]
    while len(strides) < max_stages:
        finest = min(cur_spacing)
        for d in range(ndim):
            if kernel[d] == 1 and cur_spacing[d] / finest < 2:
                kernel[d] = 3
        # the spacing rule compares the axes that can still be pooled by size: an axis too short to pool (a thin
        # slab) must not hold the others back once their spacing has passed its own (20x160x160 at 1 mm stopped
        # at 5x20x20, a bottleneck that sees a fifth of the slab; nnU-Net's rule pools on to 5x5x5)
        big = [d for d in range(ndim) if cur_size[d] >= 2 * min_size]
        finest_big = min((cur_spacing[d] for d in big), default=finest)
        can_pool = [d for d in big if cur_spacing[d] / finest_big < 2]
        if not can_pool or (len(can_pool) == 1 and ndim > 1 and cur_size[can_pool[0]] < 3 * min_size):
            break
        kernels.append(list(kernel))
        stride = [2 if d in can_pool else 1 for d in range(ndim)]
        strides.append(stride)
        for d in can_pool:
            cur_spacing[d] *= 2
            cur_size[d] = math.ceil(cur_size[d] / 2)
    finest = min(cur_spacing)
    kernels.append([3 if cur_spacing[d] / finest < 2 else kernel[d] for d in range(ndim)])
    topo = Topology(kernels, strides, list(patch))
    topo.patch_size = [int(math.ceil(p / d) * d) for p, d in zip(patch, topo.divisor)]
    return topo


def features_per_stage(n_stages: int, base: int, cap: int) -> list[int]:
    return [min(base * 2 ** i, cap) for i in range(n_stages)]


def make_network(family: str, topo: Topology, base: int, cap: int, blocks: list[int] | None = None,
                 decoder_convs: int = 2) -> Network:
    return Network(family=family, features=features_per_stage(topo.n_stages, base, cap),
                   kernel_sizes=topo.kernel_sizes, strides=topo.strides,
                   blocks_per_stage=blocks if blocks is not None else [2] * topo.n_stages,
                   decoder_convs=decoder_convs)


# --- patch size -------------------------------------------------------------------------------------------

def initial_patch(spacing: list[float], median_shape: list[int], voxels: int) -> list[int]:
    """A patch of ``voxels`` voxels shaped like a cube in millimetres, clipped to the median image."""
    inv = 1.0 / np.asarray(spacing, float)
    shape = inv / np.prod(inv) ** (1 / len(inv)) * voxels ** (1 / len(inv))
    return [int(max(1, min(round(s), m))) for s, m in zip(shape, median_shape)]


def object_patch(fp: Fingerprint, spacing: list[float], order: list[int], median_shape: list[int],
                 context: float = 1.25) -> list[int]:
    """The patch that holds the typical large object (95th percentile extent) with some context."""
    extent = np.zeros(len(spacing))
    for c in fp.classes:
        p95 = c.extent_mm.get("p95") or []
        if len(p95) == len(fp.median_spacing):
            e = np.asarray(permute(p95, order), float)[-len(spacing):]
            extent = np.maximum(extent, e)
    vox = np.ceil(extent / np.asarray(spacing) * context) + 8
    return [int(min(v, m)) for v, m in zip(vox, median_shape)]


def shrink_patch(patch: list[int], median_shape: list[int], divisor: list[int], floor: list[int]) -> list[int] | None:
    """Shrink the axis whose patch is largest relative to the image by one divisor step (not below
    ``floor``); None when no axis can shrink."""
    ratios = [(p / m if p - d >= max(f, d) else -1.0) for p, m, d, f in zip(patch, median_shape, divisor, floor)]
    axis = int(np.argmax(ratios))
    if ratios[axis] < 0:
        return None
    out = list(patch)
    out[axis] -= divisor[axis]
    return out


# --- normalization, resampling, sampling, augmentation ---------------------------------------------------

def normalization(fp: Fingerprint) -> list[Normalization]:
    """CT: clip to foreground 0.5-99.5 percentiles, then global z-score. Natural images: /255. Otherwise
    per-image z-score, inside the nonzero mask when cropping removed more than a quarter of the image."""
    shapes = np.array([np.prod(c.shape) for c in fp.cases], float)
    cropped = np.array([np.prod(c.cropped_shape) for c in fp.cases], float)
    use_mask = bool(np.median(cropped / shapes) < 0.75)
    out = []
    for ch in fp.channels:
        if ch.modality == "CT":
            out.append(Normalization("ct", False, ch.percentile_00_5, ch.percentile_99_5, ch.mean, ch.std))
        elif fp.file_ending in (".png", ".bmp", ".tif", ".tiff") and ch.max <= 255 and ch.min >= 0:
            out.append(Normalization("rescale"))
        else:
            out.append(Normalization("zscore", use_mask))
    return out


def resampling(spacing: list[float]) -> Resampling:
    """Order 3 for images, 1 on one-hot labels; the out-of-plane axis on its own (nearest) when anisotropic."""
    if len(spacing) == 3 and max(spacing) > ANISOTROPY_THRESHOLD * min(spacing):
        return Resampling(3, 1, True, int(np.argmax(spacing)), 0)
    return Resampling(3, 1, False, None, 0)


def sampling(fp: Fingerprint) -> Sampling:
    """Oversample rare and tiny classes: weight ~ 1/sqrt(presence * median volume share), normalised."""
    if not fp.classes:
        return Sampling(0.33, {})
    n = max(len(fp.cases), 1)
    vols = np.array([max(c.volume_voxels.get("median", 1.0), 1.0) for c in fp.classes])
    presence = np.array([max(c.cases_present, 1) / n for c in fp.classes])
    w = 1.0 / np.sqrt(presence * vols / vols.max())
    w = w / w.sum()
    rare = presence.min() < 0.5 or vols.min() < 0.01 * vols.max()
    return Sampling(0.5 if rare else 0.33, {str(c.value): round(float(x), 4) for c, x in zip(fp.classes, w)})


def small_classes(fp: Fingerprint, patch: list[int], spacing: list[float], slice_mm: float = 1.0
                  ) -> dict[str, float]:
    """Classes whose median volume is under ``SMALL_CLASS_SHARE`` of the patch (name -> share; a 2D patch is a
    slab one slice, ``slice_mm``, thick)."""
    patch_mm3 = float(np.prod(patch)) * float(np.prod(spacing)) * (slice_mm if len(patch) == 2 else 1.0)
    shares = {c.name: c.volume_mm3.get("median", 0.0) / patch_mm3 for c in fp.classes if c.cases_present > 0}
    return {name: share for name, share in shares.items() if share < SMALL_CLASS_SHARE}


def optimizer(fp: Fingerprint, patch: list[int], spacing: list[float], slice_mm: float = 1.0
              ) -> tuple[Optimizer, str | None]:
    """SGD with Nesterov momentum (nnU-Net's) unless a class is small in the patch (:func:`small_classes`);
    then AdamW at ``ADAMW_LR``, and a note saying which class made the choice.

    Why: SGD moves each weight in proportion to its gradient, and a class that fills a fraction of a percent of
    every patch contributes that fraction of the gradient, so the features that tell it apart form only after
    the large classes are learned and the learning rate has decayed; within a CPU budget that is too late or
    never. Adam scales each weight's step by its own gradient history, so the small class's weights move as
    fast as the large classes'. Measured at fixed step counts (benchmarks/results/lesions.md), small class test
    Dice (first step at validation Dice 0.5) for SGD / AdamW 1e-3 / AdamW 3e-3: ct-aniso tumour (1000 steps)
    0.00 (never; never in 3000 either) / 0.66 (648) / 0.69 (432); vessels lesion (1000) 0.00 / 0.74 (never) /
    0.80 (636, above 0.2 from step 318); lung-nodules nodule (1527) 0.00 / 0.55 (never) / 0.74 (760). The large
    classes moved by -0.02 to +0.02 (liver 0.93, vessel 0.77-0.82, lung 0.99) and 3e-4 learned no tumour.

    Regions keep SGD: a sigmoid output is thresholded at 0.5, so the background must be pushed to a clearly
    negative logit, and Adam's steps of at most ``lr`` per weight get there slowly: on brats-like (tiny, 300
    steps, one run each) AdamW left the background at p 0.1-0.5 (loss 1.14, held-out whole tumour Dice 0.47)
    where SGD reached loss 0.45 and Dice 0.70, its smallest region (enhancing) learned by step 124."""
    if regions_of(fp.labels):
        return Optimizer(), None
    small = small_classes(fp, patch, spacing, slice_mm)
    if not small:
        return Optimizer(), None
    names = ", ".join(f"{n} ({share:.2%} of a patch)" for n, share in sorted(small.items(), key=lambda kv: kv[1]))
    return (Optimizer(name="adamw", lr=ADAMW_LR),
            f"optimizer: AdamW (lr {ADAMW_LR:g}) for small classes: {names}; SGD would learn them late")


def augmentation(ndim: int, patch: list[int], spacing: list[float]) -> Augmentation:
    """nnU-Net-like defaults; slice-wise spatial augmentation when the patch is very anisotropic."""
    dummy_2d = ndim == 3 and max(patch) / min(patch) > ANISOTROPY_THRESHOLD
    return Augmentation(rotation_deg=180.0 if ndim == 2 else 30.0, mirror_axes=list(range(ndim)),
                        dummy_2d=dummy_2d)


def lowres_spacing(spacing: list[float], median_shape: list[int], patch_voxels: int) -> list[float] | None:
    """A coarser spacing at which the median image is about four patches, scaling the finest axes first.
    None when the full-resolution patch already covers a quarter of the median image."""
    if patch_voxels >= 0.25 * float(np.prod(median_shape)):
        return None
    cur = np.asarray(spacing, float)
    full = np.asarray(spacing, float) * np.asarray(median_shape)  # mm extent
    while float(np.prod(full / cur)) > 4 * patch_voxels:
        fine = cur < cur.max() / 2 if cur.max() / cur.min() > 2 else np.ones_like(cur, bool)
        cur = np.where(fine, cur * 1.03, cur)
    return [float(s) for s in cur]


# --- instances ------------------------------------------------------------------------------------------

def instances(fp: Fingerprint) -> tuple[Instances, str | None]:
    """How instances are made, from how often the training instances touch (the fingerprint's largest
    ``touching_share`` over the instance classes): from :data:`TOUCHING_SHARE` on, connected components
    would merge objects often enough to matter, so the network learns each object's interior as an extra
    output and a seeded watershed parts them (its loss weighs the zones where objects meet up,
    :data:`CONTACT_WEIGHT`, and adds the Dice of the seeds, the interior above the watershed's threshold: a
    small share of each patch that a voxel-mean loss barely moves); below it, connected components. A note
    for plans.json when
    the dataset has instances, else None."""
    if not fp.instance_classes:
        return Instances(), None
    share = fp.touching_share()
    if share >= TOUCHING_SHARE:
        return Instances(method="watershed", contact_weight=CONTACT_WEIGHT, seed_dice=True), (
            f"instances: {share:.0%} of the training instances touch another (>= {TOUCHING_SHARE:.0%}): an "
            f"interior output and a seeded watershed part them ({', '.join(fp.instance_classes)}); its loss adds "
            f"the seeds' Dice and weighs the contact zones x{1 + CONTACT_WEIGHT:g}")
    return Instances(method="components"), (
        f"instances: {share:.0%} of the training instances touch another (< {TOUCHING_SHARE:.0%}): connected "
        f"components per class ({', '.join(fp.instance_classes)})")
