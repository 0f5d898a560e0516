"""The default planner: nnU-Net's rules, sized by measured compute and the wall-clock budget.

- spacing: median, with the 10th percentile on an axis > 3x coarser than the others; coarsest axis first
- configurations: 2d always; 3d_fullres for 3D data; 3d_lowres when the 3d_fullres patch covers < 25 %
  of the median image
- topology: pool an axis while its spacing is within 2x of the finest, kernel 1 on coarser axes,
  bottleneck >= 4 voxels, features doubling from the base width to 320 (3D) / 512 (2D)
- patch: from a mm-cube of the image, not below what holds the 95th-percentile object when the
  device allows; then width and batch fitted to measured step time and memory (autoseg.plan.fit)
- normalization, resampling, sampling and augmentation from the fingerprint (autoseg.plan.rules)
- 2D data with instance classes: a 2d_maskrcnn configuration beside 2d, when torchvision is installed
  (autoseg.plan.maskrcnn: anchors from the instances' sizes, width and patch from measured steps); it is
  offered, not trained by default (autoseg train --config 2d_maskrcnn)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autoseg.plan import budget, rules
from autoseg.plan.fit import FitRequest, fit
from autoseg.plan.maskrcnn import configure_maskrcnn, maskrcnn_available
from autoseg.plan.registry import PlanningContext, register_planner
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.labels import regions_of
from autoseg.schema.plans import Configuration, Loss, Plans, Schedule


@dataclass(frozen=True)
class Settings:
    family: str = "unet"
    blocks: tuple[int, ...] | None = None  # per stage (repeating the last); None: 2 convs per stage
    decoder_convs: int = 2
    ideal_voxels_3d: int = 160 ** 3
    ideal_voxels_2d: int = 1024 ** 2
    feature_cap_3d: int = 320
    feature_cap_2d: int = 512


DEFAULT = Settings()


def num_classes(fp: Fingerprint) -> int:
    """Network outputs: background plus each foreground value, or one sigmoid output per region."""
    regions = regions_of(fp.labels)
    return len(regions) or len([v for k, v in fp.labels.items() if isinstance(v, int) and k != "ignore"])


def loss(fp: Fingerprint) -> Loss:
    """Dice + cross-entropy over a label map's softmax; Dice + binary cross-entropy per region (sigmoid
    outputs) when dataset.json's labels define regions, which overlap."""
    return Loss(name="dice_bce") if regions_of(fp.labels) else Loss()


def ideal_patch(ndim: int, spacing: list[float], median_shape: list[int], s: Settings) -> list[int]:
    return rules.initial_patch(spacing, median_shape, s.ideal_voxels_3d if ndim == 3 else s.ideal_voxels_2d)


def configure(name: str, ndim: int, spacing: list[float], median_shape: list[int], fp: Fingerprint,
              order: list[int], run_s: float, ctx: PlanningContext, s: Settings,
              precision: tuple[str, bool, float] | None = None,
              trained: bool = True) -> tuple[Configuration, list[str], tuple]:
    """One configuration fitted to the device; ``trained``: the default ``autoseg train`` runs it, so its
    choice is measured for real (the others are planned from the proxy measurements alone)."""
    ideal = ideal_patch(ndim, spacing, median_shape, s)
    obj = [min(o, i) for o, i in zip(rules.object_patch(fp, spacing, order, median_shape), ideal)]
    req = FitRequest(family=s.family, ndim=ndim, spacing=spacing, median_shape=median_shape, ideal_patch=ideal,
                     object_patch=obj, in_channels=fp.num_channels, num_classes=num_classes(fp),
                     run_seconds=run_s, min_steps=budget.target_steps(run_s),
                     feature_cap=s.feature_cap_3d if ndim == 3 else s.feature_cap_2d,
                     dataset_voxels=dataset_voxels(fp, spacing, order), blocks=list(s.blocks) if s.blocks else None,
                     decoder_convs=s.decoder_convs, precision=precision)
    r = fit(req, ctx.device, verify=trained, store=ctx.measurements)
    val_every = max(50, min(r.steps // 10, 1000))
    slice_mm = rules.permute(fp.median_spacing, order)[0] if ndim == 2 and fp.ndim == 3 else 1.0
    opt, why = rules.optimizer(fp, r.patch_size, spacing, slice_mm)
    instances, _ = rules.instances(fp)
    network = replace(r.network, instance_outputs=1 if instances.method == "watershed" else 0)
    cfg = Configuration(
        name=name, ndim=ndim, spacing=[round(x, 6) for x in spacing], median_shape=median_shape,
        patch_size=r.patch_size, batch_size=r.batch_size, normalization=rules.normalization(fp),
        resampling=rules.resampling(spacing), network=network, loss=loss(fp), optimizer=opt,
        schedule=Schedule(steps=r.steps, val_every=val_every, checkpoint_every_s=budget.checkpoint_interval(run_s)),
        augmentation=rules.augmentation(ndim, r.patch_size, spacing), sampling=rules.sampling(fp),
        precision=r.precision, channels_last=r.channels_last, measured=r.measured, instances=instances)
    return cfg, [f"{name}: {line}" for line in [*r.log, *([why] if why else [])]], r.precision_choice


def dataset_voxels(fp: Fingerprint, spacing: list[float], order: list[int]) -> float:
    """Voxels of all cropped training images at ``spacing`` (a 2D spacing counts every slice)."""
    total, k = 0.0, len(spacing)
    for c in fp.cases:
        shape, sp = rules.permute(c.cropped_shape, order), rules.permute(c.spacing, order)
        plane = float(np.prod(rules.resampled_shape(shape[-k:], sp[-k:], spacing)))
        total += plane * float(np.prod(shape[:-k]))
    return total


def plan_with(fp: Fingerprint, ctx: PlanningContext, s: Settings = DEFAULT) -> Plans:
    order = rules.axis_order(fp.median_spacing) if fp.ndim == 3 else list(range(fp.ndim))
    spacing = rules.permute(rules.target_spacing(fp), order)
    shape = rules.median_resampled_shape(fp, spacing, order)
    is_3d = fp.ndim == 3 and shape[0] > 1
    primary = "3d_fullres" if is_3d else "2d"
    # lowres is about images larger than the patch memory allows, not about a small time budget
    low = rules.lowres_spacing(spacing, shape, int(np.prod(ideal_patch(3, spacing, shape, s)))) if is_3d else None
    others = (["3d_lowres"] if low is not None else []) + (["2d"] if is_3d else [])
    runs = budget.allocate_runs(primary, others, ctx.folds, ctx.budget_s)
    run_s = {r["configuration"]: r["seconds"] for r in runs}
    default_run_s = runs[0]["seconds"]
    configs: dict[str, Configuration] = {}
    notes: list[str] = []
    prec3d = None
    if is_3d:
        configs["3d_fullres"], log, prec3d = configure("3d_fullres", 3, spacing, shape, fp, order,
                                                       run_s["3d_fullres"], ctx, s)
        notes += log
        if low is not None:
            low_shape = rules.median_resampled_shape(fp, low, order)
            cfg, log, _ = configure("3d_lowres", 3, low, low_shape, fp, order,
                                    run_s.get("3d_lowres", default_run_s), ctx, s, prec3d, "3d_lowres" in run_s)
            configs["3d_lowres"] = replace(cfg, lowres_of="3d_fullres")
            notes += log
    in_plane = spacing[-2:]
    shape2d = shape[-2:]
    # a 2d that this budget does not train takes the 3d precision choice rather than measuring its own
    prec2d = prec3d if is_3d and "2d" not in run_s else None
    configs["2d"], log, _ = configure("2d", 2, in_plane, shape2d, fp, order, run_s.get("2d", default_run_s), ctx, s,
                                      prec2d, trained="2d" in run_s)
    notes += log
    if not is_3d and fp.instance_classes and maskrcnn_available():  # objects of their own: offer Mask R-CNN
        values = [v for n, v in fp.labels.items() if n in fp.instance_classes and isinstance(v, int)]
        configs["2d_maskrcnn"], log = configure_maskrcnn(configs["2d"], fp, values, ctx.device,
                                                         run_s.get("2d_maskrcnn", default_run_s), num_classes(fp))
        notes += log
    return Plans(dataset_name=fp.dataset_name, fingerprint_hash=fp.dataset_hash, planner=ctx.planner_name,
                 device=ctx.device.to_dict(), budget_s=ctx.budget_s, configurations=configs,
                 axis_order=order if fp.ndim == 3 else list(range(fp.ndim)), channel_names=list(fp.channel_names),
                 labels=dict(fp.labels), regions_class_order=list(fp.regions_class_order), file_ending=fp.file_ending,
                 folds=ctx.folds, train_runs=runs, notes=notes + region_notes(fp) + instance_notes(fp),
                 instance_classes=list(fp.instance_classes))


def region_notes(fp: Fingerprint) -> list[str]:
    regions = regions_of(fp.labels)
    if not regions:
        return []
    named = ", ".join(f"{n} {list(v)}" for n, v in regions.items())
    return [f"regions: one sigmoid output per region ({named}), loss dice_bce, label map painted in "
            f"regions_class_order {fp.regions_class_order}"]


def instance_notes(fp: Fingerprint) -> list[str]:
    _, note = rules.instances(fp)
    return [note] if note else []


@register_planner("default")
def plan(fp: Fingerprint, ctx: PlanningContext) -> Plans:
    return plan_with(fp, ctx, DEFAULT)
