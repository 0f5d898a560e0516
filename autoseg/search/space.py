"""The search space around the rules' configuration, as data: what a trial may change, and how a trial's
choices turn back into a :class:`~autoseg.schema.plans.Configuration` that validates like any other.

The space is derived once from the rules' point (widths x0.5/x1/x2, depth -1/0/+1 stage, patches scaled
around the rules' patch that fit the device's memory at the rules' width and batch, the four loss
families, a learning-rate range around the rules' rate, augmentation strength, mirroring on or off,
half/double batch) and
stored with the study, so every worker, on any machine, samples the same space.

>>> space = derive_space(rules_cfg, memory_bytes=8 << 30)           # doctest: +SKIP
>>> cfg = to_configuration(space, rules_cfg, rule_params(space, rules_cfg))  # == rules_cfg  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from autoseg.plan.rules import ANISOTROPY_THRESHOLD, features_per_stage, topology
from autoseg.schema.plans import REGION_LOSSES, Configuration, _check_configuration

FAMILIES = ("unet", "resenc_unet", "deeplabv3plus", "fcn")
LOSSES = ("dice_ce", "dice", "jaccard", "focal_dice")
WIDTHS = (0.5, 1.0, 2.0)
DEPTHS = (-1, 0, 1)
PATCH_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # per axis
LR_RANGE = (0.1, 3.0)  # times the rules' learning rate, log-uniform
AUGMENTATION = (0.0, 1.5, 0.25)  # strength: low, high, step (1 = the rules' augmentation)
FEATURE_CAP = {2: 512, 3: 320}
MIN_WIDTH = 4
SPARE_STEPS = 2.0  # rules planned this many times their minimum steps have time for a wider network
MIN_PATCH = 16
# encoder blocks per stage and decoder convs when a trial switches family ([] = the family's own default)
FAMILY_BLOCKS: dict[str, tuple[list[int] | None, int]] = {
    "unet": (None, 2), "fcn": (None, 2), "resenc_unet": ([1, 3, 4, 6, 6, 6, 6], 1), "deeplabv3plus": ([], 2),
}


@dataclass
class SearchSpace:
    """The choices a trial may make; every list's values are JSON scalars (Optuna categorical choices)."""

    configuration: str
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    depths: list[int] = field(default_factory=lambda: list(DEPTHS))
    widths: list[float] = field(default_factory=lambda: list(WIDTHS))
    patches: list[str] = field(default_factory=list)  # "ZxYxX", the rules' patch first
    losses: list[str] = field(default_factory=lambda: list(LOSSES))
    lr: list[float] = field(default_factory=list)  # [low, high], log scale
    augmentation: list[float] = field(default_factory=lambda: list(AUGMENTATION))
    batches: list[int] = field(default_factory=list)
    mirror: list[bool] = field(default_factory=lambda: [True, False])  # True: the rules' mirror axes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        return cls(**{"mirror": [True], **d})  # a study stored before mirroring was searched keeps its space


def patch_key(patch: list[int]) -> str:
    return "x".join(str(int(p)) for p in patch)


def parse_patch(key: str) -> list[int]:
    return [int(p) for p in key.split("x")]


def _total_stride(strides: list[list[int]]) -> list[int]:
    d = [1] * len(strides[0])
    for s in strides:
        d = [a * b for a, b in zip(d, s)]
    return d


def patch_candidates(cfg: Configuration, memory_bytes: float) -> list[list[int]]:
    """Patches around the rules' one (each axis scaled, rounded to the network's total stride, between 16
    voxels and the median image), kept when the rules' network at the rules' batch is estimated to fit
    ``memory_bytes``: its measured peak memory scaled by the voxels (activations dominate). The rules' patch
    comes first and is always kept."""
    rule = list(cfg.patch_size)
    div = _total_stride(cfg.network.strides)
    measured = cfg.measured.peak_memory_mb * 2 ** 20
    out = [rule]
    for s in PATCH_SCALES:
        cand = []
        for p, d, m in zip(rule, div, cfg.median_shape):
            top = max(int(math.ceil(m / d) * d), d)  # no bigger than the image, rounded up to the stride
            bottom = min(max(MIN_PATCH, d), top)
            cand.append(int(min(max(round(p * s / d) * d, bottom), top)))
        if cand in out:
            continue
        if measured > 0 and measured * np.prod(cand) / np.prod(rule) > memory_bytes:
            continue
        out.append(cand)
    return [out[0]] + sorted(out[1:], key=lambda p: (np.prod(p), p))


def derive_space(cfg: Configuration, memory_bytes: float) -> SearchSpace:
    """The space around ``cfg`` (the rules' configuration); every rules' value is one of its choices."""
    families = list(FAMILIES) + ([cfg.network.family] if cfg.network.family not in FAMILIES else [])
    if cfg.loss.name in REGION_LOSSES:  # regions train sigmoid outputs: the label-map losses do not apply
        losses = [cfg.loss.name]
    else:
        losses = list(LOSSES) + ([cfg.loss.name] if cfg.loss.name not in LOSSES else [])
    b = cfg.batch_size
    lr = cfg.optimizer.lr
    return SearchSpace(configuration=cfg.name, families=families, patches=[patch_key(p) for p in
                                                                           patch_candidates(cfg, memory_bytes)],
                       losses=losses, lr=[lr * LR_RANGE[0], lr * LR_RANGE[1]],
                       batches=sorted({max(1, b // 2), b, 2 * b}),
                       mirror=[True, False] if cfg.augmentation.mirror_axes else [False])


def rule_params(space: SearchSpace, cfg: Configuration) -> dict[str, Any]:
    """The trial parameters that give back the rules' configuration exactly (enqueued as trial 0)."""
    return {"family": cfg.network.family, "depth": 0, "width": 1.0, "patch": patch_key(cfg.patch_size),
            "loss": cfg.loss.name, "lr": cfg.optimizer.lr, "augmentation": 1.0, "batch": cfg.batch_size,
            "mirror": bool(cfg.augmentation.mirror_axes)}


# single changes to the rules' point, most promising first: a few trials learn more from moves one at a time
# around a strong point than from random draws that change eight things at once (TPE's first trials are
# random). Half the width first: in a short budget the rules' widest network that still gets its minimum
# steps is the likeliest to lose to one that gets twice the steps; lighter augmentation next, as the
# rules' augmentation is nnU-Net's, made for 1000 epochs.
NEIGHBOURS: tuple[tuple[str, Any], ...] = (
    ("width", 0.5), ("augmentation", 0.5), ("lr", 2.0), ("width", 2.0), ("patch", "smaller"),
    ("loss", "focal_dice"), ("family", "resenc_unet"), ("batch", 0.5))
NO_MIRROR = ("mirror", False)  # a single change only where a class lies on one side (see ``mirror_hides_side``)


def neighbours(space: SearchSpace, rules: dict[str, Any], wider_first: bool = False,
               mirror_first: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(label, parameters) of the rules' point ``rules`` with one value changed, for each of ``NEIGHBOURS``
    that the space holds, in that order; ``wider_first`` puts twice the width first (for rules that stopped at
    their largest network with time to spare, where a wider one is the likelier gain); ``mirror_first`` puts
    training without mirroring before everything (for a class labelled by its side)."""
    out = []
    order = sorted(NEIGHBOURS, key=lambda m: m != ("width", 2.0)) if wider_first else list(NEIGHBOURS)
    if mirror_first:
        order.insert(0, NO_MIRROR)
    for key, move in order:
        params, value = dict(rules), None
        if key == "mirror":
            if move not in space.mirror:
                continue
            value, label = move, "no mirroring"
        elif key in ("width", "augmentation"):
            value, label = rules[key] * move, f"{key} x{move:g}"
            lo, hi = (min(space.widths), max(space.widths)) if key == "width" else space.augmentation[:2]
            if (key == "width" and value not in space.widths) or not lo <= value <= hi:
                continue
        elif key == "lr":
            value = min(rules["lr"] * move, space.lr[1])
            label = f"lr x{value / rules['lr']:.3g}"
        elif key == "patch":
            smaller = [k for k in space.patches[1:] if np.prod(parse_patch(k)) < np.prod(parse_patch(rules["patch"]))]
            if not smaller:
                continue
            value, label = smaller[-1], f"patch {smaller[-1]}"
        elif key == "batch":
            value = max(1, int(rules["batch"] * move))
            if value not in space.batches:
                continue
            label = f"batch {value}"
        else:
            if move not in (space.families if key == "family" else space.losses):
                continue
            value, label = move, f"{key} {move}"
        if value == rules[key]:
            continue
        params[key] = value
        out.append((label, params))
    return out


def mirror_hides_side(classes: list, axis_order: list[int], cfg: Configuration) -> bool:
    """Whether ``cfg`` mirrors an axis along which a class lies on one side of the image in 9 of 10 cases
    (``classes``: the fingerprint's :class:`~autoseg.fingerprint.ClassStats`). A left kidney mirrored looks like
    a right one: where nothing else in the patch tells the side, mirroring teaches the network that the side
    does not matter. Where the anatomy around tells it (the liver is on the right), mirroring is harmless, so
    this is a reason to try training without it first, not to drop it: the trial decides."""
    sided = {a for c in classes for a in c.sided_axes()}
    if not sided:
        return False
    ndim_data = len(classes[0].center.get("p10", [])) or cfg.ndim
    order = list(axis_order) or list(range(ndim_data))
    offset = len(order) - cfg.ndim  # a 2d configuration of 3D data mirrors the last two (preprocessed) axes
    return any(0 <= m + offset < len(order) and order[m + offset] in sided for m in cfg.augmentation.mirror_axes)


def has_time_to_spare(cfg: Configuration) -> bool:
    """Whether the rules' planned steps are at least ``SPARE_STEPS`` times the minimum their run needs
    (:func:`autoseg.plan.budget.target_steps`): the planner stopped at its largest network, not at the budget."""
    from autoseg.plan.budget import target_steps

    steps = cfg.schedule.steps
    return steps >= SPARE_STEPS * target_steps(steps * cfg.measured.step_time_s)


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    """Ask an Optuna trial for one point of ``space``."""
    lo, hi, step = space.augmentation
    return {"family": trial.suggest_categorical("family", space.families),
            "depth": trial.suggest_categorical("depth", space.depths),
            "width": trial.suggest_categorical("width", space.widths),
            "patch": trial.suggest_categorical("patch", space.patches),
            "loss": trial.suggest_categorical("loss", space.losses),
            "lr": trial.suggest_float("lr", space.lr[0], space.lr[1], log=True),
            "augmentation": trial.suggest_float("augmentation", lo, hi, step=step),
            "batch": trial.suggest_categorical("batch", space.batches),
            "mirror": trial.suggest_categorical("mirror", space.mirror)}


def _feature_cap(cfg: Configuration) -> int:
    f = cfg.network.features
    if len(f) >= 2 and f[-1] == f[-2]:  # the rules' planner capped the width: keep its cap
        return f[-1]
    return max(FEATURE_CAP[cfg.ndim], max(f))


def to_configuration(space: SearchSpace, cfg: Configuration, params: dict[str, Any]) -> Configuration:
    """The rules' configuration ``cfg`` with a trial's ``params`` applied, checked like an edited plans.json.

    Patch and depth give a new topology by the same rule the planner uses (``autoseg.plan.rules.topology``;
    depth +1 lets the bottleneck shrink to 2 voxels); a family switch takes that family's default blocks.
    The rules' own parameters give back ``cfg`` unchanged."""
    net = cfg.network
    patch, depth = parse_patch(params["patch"]), int(params["depth"])
    if patch == list(cfg.patch_size) and depth == 0:
        kernels, strides = net.kernel_sizes, net.strides
    else:
        topo = topology(cfg.spacing, patch)
        if depth < 0:
            topo = topology(cfg.spacing, patch, max_stages=max(2, topo.n_stages + depth))
        elif depth > 0:
            topo = topology(cfg.spacing, patch, min_size=2, max_stages=topo.n_stages + depth)
        kernels, strides, patch = topo.kernel_sizes, topo.strides, topo.patch_size
    n = len(strides)
    width = float(params["width"])
    if width == 1.0 and n == net.n_stages:
        features = list(net.features)
    else:
        base = max(MIN_WIDTH, int(round(net.features[0] * width)))
        features = features_per_stage(n, base, _feature_cap(cfg))
    family = params["family"]
    if family == net.family:
        blocks = (net.blocks_per_stage + [net.blocks_per_stage[-1]] * n)[:n] if net.blocks_per_stage else []
        decoder_convs = net.decoder_convs
    else:
        pattern, decoder_convs = FAMILY_BLOCKS.get(family, (None, net.decoder_convs))
        blocks = [2] * n if pattern is None else (pattern + [pattern[-1]] * n)[:n] if pattern else []
    network = replace(net, family=family, features=features, kernel_sizes=[list(k) for k in kernels],
                      strides=[list(s) for s in strides], blocks_per_stage=blocks, decoder_convs=decoder_convs)
    aug = cfg.augmentation
    if patch != list(cfg.patch_size):
        aug = replace(aug, dummy_2d=cfg.ndim == 3 and max(patch) / min(patch) > ANISOTROPY_THRESHOLD)
    strength = float(params["augmentation"])
    if strength != 1.0:
        from autoseg.augment import scaled  # batchgenerators: a second to import, only when needed

        aug = scaled(aug, strength)
    if not params.get("mirror", True):
        aug = replace(aug, mirror_axes=[])  # in training, and so in test-time mirroring
    out = replace(cfg, patch_size=[int(p) for p in patch], batch_size=int(params["batch"]), network=network,
                  loss=replace(cfg.loss, name=params["loss"]),
                  optimizer=replace(cfg.optimizer, lr=float(params["lr"])), augmentation=aug)
    _check_configuration(out, f"search trial {params}")
    return out
