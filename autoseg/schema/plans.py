"""The Plans data model: how a dataset is preprocessed, which network trains on it and for how long.

``plans.json`` is the single, human-editable description of every configuration (``2d``, ``3d_fullres``,
``3d_lowres``). Every knob is a value here, never a subclass: a user can edit the file and re-run
``preprocess`` or ``train``. Loading validates it and names the offending key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoseg.artifacts import header, write_json
from autoseg.errors import UserError
from autoseg.schema.labels import (
    ClassKey,
    foreground_classes,
    ignore_label_of,
    region_problems,
    regions_of,
    scored_classes,
)
from autoseg.schema.records import build_record

FORMAT_VERSION = 1

# The component names a plans file may use, each built by the function registered under it
# (autoseg.nets, autoseg.losses, autoseg.normalize; see autoseg.schema.registry, which adds new ones).
NETWORK_FAMILIES = {"unet", "resenc_unet", "fcn", "deeplabv3plus", "maskrcnn"}
LOSS_NAMES = {"dice_ce", "dice", "jaccard", "ce", "focal", "focal_dice", "dice_topk", "dice_bce", "maskrcnn"}
# losses of sigmoid outputs, one per region (region datasets train with one of these, label maps never do)
REGION_LOSSES = {"dice_bce"}
NORMALIZATION_SCHEMES = {"ct", "zscore", "rescale", "none"}

# Sizes no real model reaches (nnU-Net's patches are ~128^3 = 2M voxels, batches 2-12, a few input channels,
# up to ~120 classes), far below what would exhaust a machine: a plan past them is a typo or a hostile file,
# refused when it loads rather than when its first tile is allocated.
MAX_PATCH_VOXELS = 1 << 27  # 512^3
MAX_BATCH = 1024
MAX_CHANNELS = 256
MAX_CLASSES = 1024


@dataclass
class Normalization:
    """How one channel is normalized. ``ct``: clip to [clip_low, clip_high], then (x - mean) / std with the
    dataset's foreground statistics. ``zscore``: per image, inside the nonzero mask when ``use_mask``.
    ``rescale``: divide by 255 (natural images). ``none``: as is."""

    scheme: str = "zscore"
    use_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class Resampling:
    """Interpolation orders, and whether the out-of-plane axis is resampled separately (anisotropic data)."""

    image_order: int = 3
    label_order: int = 1  # applied to one-hot labels, then argmax
    separate_z: bool = False
    z_axis: int | None = None
    z_order: int = 0


@dataclass
class Network:
    """A network described as data; ``autoseg.nets.build_network`` builds it by ``family``."""

    family: str = "unet"  # registry name: unet, resenc_unet, ...
    features: list[int] = field(default_factory=list)  # per stage
    kernel_sizes: list[list[int]] = field(default_factory=list)  # per stage
    strides: list[list[int]] = field(default_factory=list)  # per stage; the first is all ones
    blocks_per_stage: list[int] = field(default_factory=list)  # encoder convs (unet) or residual blocks
    decoder_convs: int = 2
    norm: str = "instance"
    nonlin: str = "leaky_relu"
    deep_supervision: bool = True
    # output channels after the classes: 1 = each object's interior, the touching-object formulation
    # (Configuration.instances.method "watershed"); every builder gets num_classes + instance_outputs
    instance_outputs: int = 0
    # Mask R-CNN (family maskrcnn): feature pyramid width, anchor size (pixels) per pyramid level and the
    # pooled one, detections kept per image
    fpn_channels: int = 0
    anchor_sizes: list[int] = field(default_factory=list)
    max_instances: int = 0

    @property
    def n_stages(self) -> int:
        return len(self.features)


@dataclass
class Loss:
    name: str = "dice_ce"  # dice_ce, dice, jaccard, ce, focal, focal_dice, dice_topk; regions: dice_bce
    batch_dice: bool = False
    ds_weights: str = "halving"  # deep-supervision weights: halving from full resolution, lowest dropped


@dataclass
class Optimizer:
    name: str = "sgd"  # sgd (Nesterov) or adamw
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0


@dataclass
class Schedule:
    """In optimizer steps, derived from the budget and the measured step time."""

    name: str = "poly"
    steps: int = 1000
    warmup_steps: int = 0
    poly_exponent: float = 0.9
    val_every: int = 250
    # a killed run resumes from its last periodic checkpoint; the planner sets 5 % of the run
    # (autoseg.plan.budget.checkpoint_interval); 300 in plans made before that rule
    checkpoint_every_s: float = 300.0


@dataclass
class Augmentation:
    rotation_deg: float = 30.0
    scale: list[float] = field(default_factory=lambda: [0.7, 1.4])
    elastic: bool = False
    noise: float = 0.1
    blur: float = 0.2
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: float = 0.3
    low_resolution: float = 0.25
    mirror_axes: list[int] = field(default_factory=list)
    dummy_2d: bool = False  # slice-wise (2D) spatial augmentation for very anisotropic 3D patches


@dataclass
class Sampling:
    """Foreground oversampling: a share of patches centred on a voxel of a randomly chosen present class."""

    foreground_fraction: float = 0.33
    class_weights: dict[str, float] = field(default_factory=dict)  # label value -> relative probability


@dataclass
class Instances:
    """How a configuration's label maps become instances of the plan's instance classes: ``components``
    (connected components per class) or ``watershed`` (the network's interior output seeds a watershed that
    parts touching objects; :mod:`autoseg.instances`). The interior's loss (:class:`autoseg.losses.InteriorLoss`)
    can weigh the zones where objects meet up (``contact_weight``) and add the Dice of the seeds
    (``seed_dice``): the rules set both (benchmarks/results/instance_methods.md). Datasets without instances
    keep the default."""

    method: str = "components"  # components | watershed | detections (Mask R-CNN's objects, folds mask-voted)
    interior_weight: float = 1.0  # weight of the interior output's loss beside the segmentation loss
    threshold: float = 0.5  # interior probability above which a voxel belongs to an object's seed
    contact_weight: float = 0.0  # extra weight of the interior loss where two objects meet (0: none)
    seed_dice: bool = False  # add a soft Dice of the seeds (interior > threshold) to the interior loss


INSTANCE_METHODS = {"components", "watershed", "detections"}  # detections: the maskrcnn family's own objects


@dataclass
class Measurement:
    """What the planner measured for the chosen setup on the target device."""

    step_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    parameters: int = 0
    gflops_per_step: float = 0.0
    precision_speedup: float = 1.0  # bf16/fp16 over fp32, as measured
    extrapolated: bool = False  # True when predicted from smaller measured proxy patches, not measured as is


@dataclass
class Configuration:
    """One way to process and train on the dataset."""

    name: str
    ndim: int
    spacing: list[float]
    median_shape: list[int]  # after resampling to ``spacing``, of the cropped images
    patch_size: list[int]
    batch_size: int
    normalization: list[Normalization]
    resampling: Resampling
    network: Network
    loss: Loss = field(default_factory=Loss)
    optimizer: Optimizer = field(default_factory=Optimizer)
    schedule: Schedule = field(default_factory=Schedule)
    augmentation: Augmentation = field(default_factory=Augmentation)
    sampling: Sampling = field(default_factory=Sampling)
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (CUDA AMP)
    channels_last: bool = False
    measured: Measurement = field(default_factory=Measurement)
    instances: Instances = field(default_factory=Instances)
    lowres_of: str | None = None  # set on 3d_lowres: the configuration it is a coarser version of


@dataclass
class Plans:
    """All configurations for one dataset, and what they were planned for."""

    dataset_name: str
    fingerprint_hash: str
    planner: str
    device: dict[str, Any]
    budget_s: float
    configurations: dict[str, Configuration]
    axis_order: list[int] = field(default_factory=list)  # transpose applied before everything: coarsest axis first
    channel_names: list[str] = field(default_factory=list)  # the input contract: channels in file order
    labels: dict[str, Any] = field(default_factory=dict)  # dataset.json labels (name -> value or region list)
    regions_class_order: list[int] = field(default_factory=list)  # regions: the value each one paints, in order
    instance_classes: list[str] = field(default_factory=list)  # dataset.json's: names of the classes of instances
    file_ending: str = ".nii.gz"
    folds: int = 5
    train_runs: list[dict[str, Any]] = field(default_factory=list)  # [{"configuration", "fold", "seconds"}]
    planning_time_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)  # {"reused": n, "measured": n} step measurements
    notes: list[str] = field(default_factory=list)
    # set by `autoseg plan --search`: the study, its best trial, and the rules' configuration it replaced
    search: dict[str, Any] = field(default_factory=dict)
    # set by `autoseg plan/train --init model.autoseg`: the bundle whose networks this plan fine-tunes (name,
    # sha256, dataset, date), which of its folds starts each run, and the fine-tuning rule's numbers
    finetune: dict[str, Any] = field(default_factory=dict)
    meta: dict = field(default_factory=dict, compare=False)  # bookkeeping (who wrote the file), not content

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        return ignore_label_of(self.labels)

    @property
    def regions(self) -> list[tuple[int, ...]]:
        """The regions' label values, in output order ([] for a plain label map: softmax outputs)."""
        return list(regions_of(self.labels).values())

    @property
    def num_classes(self) -> int:
        """Network outputs: background plus each foreground value, or one sigmoid output per region."""
        if self.regions:
            return len(self.regions)
        return len([v for k, v in self.labels.items() if isinstance(v, int) and k != "ignore"])

    @property
    def class_names(self) -> dict[int, str]:
        """Foreground class index -> name (plain label maps)."""
        return foreground_classes(self.labels)

    @property
    def instance_values(self) -> list[int]:
        """The label values of the instance classes, ascending ([] for a plan without instances)."""
        return sorted(v for v, name in self.class_names.items() if name in self.instance_classes)

    @property
    def scored_classes(self) -> dict[ClassKey, str]:
        """What validation, selection and post-processing score: the foreground values, or the regions."""
        return scored_classes(self.labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("meta")
        return {**header("plans"), **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "plans") -> Plans:
        return _parse_plans(d, source)

    def save(self, path: Path | str) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path | str) -> Plans:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no plans here; run `autoseg plan DATASET` first")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e
        return _parse_plans(d, str(path))


_NESTED = {"normalization": Normalization, "resampling": Resampling, "network": Network, "loss": Loss,
           "optimizer": Optimizer, "schedule": Schedule, "augmentation": Augmentation,
           "sampling": Sampling, "measured": Measurement, "instances": Instances}


def build(cls: type, d: Any, where: str) -> Any:
    """A plans record (a configuration or one of its parts) from a dict, every key checked (the key's path
    named in the error)."""
    return build_record(cls, d, where, {} if cls is Plans else _NESTED)


def _parse_plans(d: Any, source: str) -> Plans:
    if not isinstance(d, dict) or d.get("artifact") != "plans":
        raise UserError(f"{source}: not a plans file (missing \"artifact\": \"plans\")")
    if d.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{source}: format_version {d.get('format_version')!r} is not supported "
                        f"(this autoseg reads {FORMAT_VERSION}); re-run `autoseg plan`")
    body = {k: v for k, v in d.items() if k not in ("artifact", "format_version", "autoseg_version")}
    configs = body.pop("configurations", None)
    if not isinstance(configs, dict) or not configs:
        raise UserError(f"{source}: 'configurations' must be a non-empty object")
    plans = build(Plans, {**body, "configurations": {}}, source)
    _check_plans(plans, source)
    for name, c in configs.items():
        cfg = build(Configuration, c, f"{source}: configurations.{name}")
        _check_configuration(cfg, f"{source}: configurations.{name}", len(plans.channel_names))
        _check_loss_kind(cfg, f"{source}: configurations.{name}", bool(plans.regions))
        plans.configurations[name] = cfg
    plans.meta = {"autoseg_version": d.get("autoseg_version")}
    return plans


def _check_plans(plans: Plans, source: str) -> None:
    """What holds for every configuration: the axis order is a permutation of the image axes, and the input
    channels and output classes are within :data:`MAX_CHANNELS` and :data:`MAX_CLASSES`."""
    order = plans.axis_order
    if order and (len(order) not in (2, 3) or sorted(order) != list(range(len(order)))):
        raise UserError(f"{source}: axis_order {order} is not a permutation of the image axes (e.g. [0, 1, 2])")
    if plans.in_channels > MAX_CHANNELS:
        raise UserError(f"{source}: channel_names: {plans.in_channels} input channels, more than a model takes "
                        f"({MAX_CHANNELS})")
    if plans.num_classes > MAX_CLASSES:
        raise UserError(f"{source}: labels: {plans.num_classes} classes, more than a model has ({MAX_CLASSES})")
    if plans.regions:
        order = plans.regions_class_order
        if len(order) != len(plans.regions):
            raise UserError(f"{source}: regions_class_order: expected one value per region ({len(plans.regions)}), "
                            f"got {order}")
        problems = region_problems(plans.labels, order)
        if problems:
            raise UserError(f"{source}: {problems[0]}")


def _check_loss_kind(c: Configuration, where: str, regions: bool) -> None:
    """Region plans train sigmoid outputs with a region loss; label maps a softmax loss."""
    if regions and c.loss.name not in REGION_LOSSES:
        raise UserError(f"{where}.loss.name: the labels define regions, which train with "
                        f"{' or '.join(sorted(REGION_LOSSES))}, not '{c.loss.name}'")
    if not regions and c.loss.name in REGION_LOSSES:
        raise UserError(f"{where}.loss.name: '{c.loss.name}' trains regions, and the labels define none")


def _check_configuration(c: Configuration, where: str, channels: int = 0) -> None:
    """Semantic checks a user's edit can break: lengths agree with ndim, sizes positive, known names."""
    n = c.ndim
    for key in ("spacing", "patch_size", "median_shape"):
        v = getattr(c, key)
        if len(v) != n or any(x <= 0 for x in v):
            raise UserError(f"{where}.{key}: expected {n} positive numbers, got {v}")
    if math.prod(c.patch_size) > MAX_PATCH_VOXELS:
        raise UserError(f"{where}.patch_size: {c.patch_size} is {math.prod(c.patch_size)} voxels per tile, more than "
                        f"a model uses ({MAX_PATCH_VOXELS})")
    if c.batch_size < 1:
        raise UserError(f"{where}.batch_size: must be >= 1, got {c.batch_size}")
    if c.batch_size > MAX_BATCH:
        raise UserError(f"{where}.batch_size: {c.batch_size}, more than a model uses ({MAX_BATCH})")
    if channels and len(c.normalization) != channels:
        raise UserError(f"{where}.normalization: expected one entry per input channel ({channels}), "
                        f"got {len(c.normalization)}")
    for i, scheme in enumerate(x.scheme for x in c.normalization):
        if scheme not in NORMALIZATION_SCHEMES:
            raise UserError(f"{where}.normalization[{i}].scheme: unknown '{scheme}' "
                            f"(known: {', '.join(sorted(NORMALIZATION_SCHEMES))})")
    if c.loss.name not in LOSS_NAMES:
        raise UserError(f"{where}.loss.name: unknown '{c.loss.name}' (known: {', '.join(sorted(LOSS_NAMES))})")
    net = c.network
    if net.family not in NETWORK_FAMILIES:
        raise UserError(f"{where}.network.family: unknown '{net.family}' (known: {', '.join(sorted(NETWORK_FAMILIES))})")
    for key in ("kernel_sizes", "strides"):
        v = getattr(net, key)
        if len(v) != net.n_stages or any(len(k) != n for k in v):
            raise UserError(f"{where}.network.{key}: expected {net.n_stages} entries of {n} integers")
    if net.blocks_per_stage and len(net.blocks_per_stage) != net.n_stages:
        raise UserError(f"{where}.network.blocks_per_stage: expected {net.n_stages} entries")
    divisor = [1] * n
    for s in net.strides:
        divisor = [a * b for a, b in zip(divisor, s)]
    if any(p % d for p, d in zip(c.patch_size, divisor)):
        raise UserError(f"{where}.patch_size: {c.patch_size} must be divisible by {divisor} (the network's total stride)")
    if c.instances.method not in INSTANCE_METHODS:
        raise UserError(f"{where}.instances.method: unknown '{c.instances.method}' "
                        f"(known: {', '.join(sorted(INSTANCE_METHODS))})")
    if not (math.isfinite(c.instances.contact_weight) and c.instances.contact_weight >= 0):
        raise UserError(f"{where}.instances.contact_weight: {c.instances.contact_weight} must be a number >= 0")
    wants = 1 if c.instances.method == "watershed" else 0
    if net.instance_outputs != wants:
        raise UserError(f"{where}.network.instance_outputs: instances.method '{c.instances.method}' needs "
                        f"{wants} (the interior output), got {net.instance_outputs}")
    if (net.family == "maskrcnn") != (c.loss.name == "maskrcnn"):
        raise UserError(f"{where}: network family {net.family} with loss {c.loss.name}: the maskrcnn family "
                        "trains on its own loss, named maskrcnn, and no other family can")
    if net.family == "maskrcnn" and c.instances.method != "detections":
        raise UserError(f"{where}.instances.method: a maskrcnn network's instances are its detections "
                        f"(method 'detections'), not '{c.instances.method}'")
    if c.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"{where}.precision: expected fp32, bf16 or fp16, got '{c.precision}'")
    if c.schedule.steps < 1:
        raise UserError(f"{where}.schedule.steps: must be >= 1")
