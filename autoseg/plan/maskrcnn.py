"""Plan a Mask R-CNN configuration for a 2D dataset with instance classes: anchors from the objects' sizes, the
backbone width and the input size fitted to the measured step time, like the U-Net families.

Rules (each reads the fingerprint or the measured device, never a task's name):
- objects: the typical object of each instance class is its median area per case over its median number of
  objects per case (the fingerprint's volume and component statistics), at the planned spacing; the smallest
  anchor is that side of the smallest class rounded to a power of two (at least 4 pixels), doubling per level;
- backbone: a stem and residual stages of stride 2 until the coarsest map is at most ~8x the largest object's
  side... kept between 3 and 5 stages after the stem; the input is the 2D configuration's patch;
- size: candidates from wide to narrow (then a half patch) are timed for real (a warm-up and two training
  steps on a batch of synthetic objects of the typical size); the first whose steps fit the run's minimum
  number of steps into its seconds is taken, else the cheapest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from autoseg.device import DeviceInfo, sync
from autoseg.plan import budget
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Configuration, Instances, Loss, Measurement, Network, Optimizer

WIDTHS = ((32, 64), (16, 32), (8, 16))  # (stem features, feature pyramid width), widest first
MIN_STAGES, MAX_STAGES = 3, 5
BATCH = 2


@dataclass
class Candidate:
    network: Network
    patch: list[int]
    batch: int


def maskrcnn_available() -> bool:
    """Whether torchvision can be imported here (the optional extra ``autoseg[instances]``)."""
    from autoseg.nets.torchvision_ops import import_torchvision

    try:
        import_torchvision()
    except (ImportError, RuntimeError):
        return False
    return True


def typical_object_px(fp: Fingerprint, values: list[int], spacing: list[float]) -> list[float]:
    """Per instance class, the side in pixels (at ``spacing``) of its typical object: the median instance size
    of the fingerprint's instance statistics, else the class's median size per case over its median number of
    objects per case."""
    scale = float(np.prod(fp.median_spacing[-2:])) / float(np.prod(spacing[-2:]))  # original -> planned pixels
    sides = []
    for c in fp.classes:
        if c.value not in values:
            continue
        voxels = float(c.instances.get("voxels", {}).get("median", 0.0)) if c.instances else 0.0
        if not voxels:
            voxels = float(c.volume_voxels.get("median", 0.0)) / max(float(c.components_per_case.get("median", 1)), 1)
        if fp.ndim == 3:  # a 2D configuration of 3D data: one slice through a typical object
            voxels = voxels ** (2 / 3)
        sides.append(math.sqrt(max(voxels * scale, 1.0)))
    return sides


def most_objects(fp: Fingerprint, values: list[int]) -> float:
    """The most objects of the instance classes in one case (the fingerprint's instance or component counts)."""
    counts = [float((c.instances.get("per_case") or c.components_per_case).get("max", 0.0)) if c.instances
              else float(c.components_per_case.get("max", 0.0)) for c in fp.classes if c.value in values]
    return sum(counts) if counts else 100.0


def anchor_sizes(object_sides: list[float], levels: int) -> list[int]:
    """One anchor per pyramid level, the pooled level included: the smallest object's side rounded to a power
    of two (at least 4 pixels), doubling per level."""
    smallest = min(object_sides) if object_sides else 8.0
    base = max(4, 2 ** round(math.log2(max(smallest, 1.0))))
    return [base * 2 ** i for i in range(levels)]


def network_for(patch: list[int], stem: int, fpn: int, object_sides: list[float], max_instances: int) -> Network:
    largest = max(object_sides) if object_sides else 16.0
    stages = MIN_STAGES
    while stages < MAX_STAGES and 2 ** stages < largest and min(patch) // 2 ** (stages + 1) >= 4:
        stages += 1
    features = [stem] + [min(stem * 2 ** i, 8 * stem) for i in range(stages)]
    return Network(family="maskrcnn", features=features, kernel_sizes=[[3, 3]] * (stages + 1),
                   strides=[[1, 1]] + [[2, 2]] * stages, blocks_per_stage=[1] * (stages + 1), norm="group",
                   nonlin="relu", deep_supervision=False, fpn_channels=fpn,
                   anchor_sizes=anchor_sizes(object_sides, stages + 1), max_instances=max_instances)


def synthetic_batch(batch: int, channels: int, patch: list[int], side: float, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with square objects of ``side`` pixels of class 1, a handful per image (timing only)."""
    g = np.random.default_rng(seed)
    target = np.zeros((batch, *patch), np.int16)
    s = max(2, int(round(side)))
    for b in range(batch):
        for _ in range(max(1, min(8, int(np.prod(patch) / (4 * s * s))))):
            y, x = (int(g.integers(0, max(1, p - s))) for p in patch)
            target[b, y:y + s, x:x + s] = 1
    images = torch.from_numpy(g.normal(size=(batch, channels, *patch)).astype(np.float32))
    return images + torch.from_numpy(target[:, None].astype(np.float32)), torch.from_numpy(target)


def time_step(cand: Candidate, in_channels: int, num_classes: int, device: torch.device, side: float
              ) -> tuple[float, int]:
    """Seconds of one real Mask R-CNN training step (the faster of two, after a warm-up), and its parameters."""
    from autoseg.nets import build_network, count_parameters

    torch.manual_seed(0)
    model = build_network(cand.network, in_channels, num_classes, 2).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, target = synthetic_batch(cand.batch, in_channels, cand.patch, side)
    images, target = images.to(device), target.to(device)
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        loss = sum(model(images, target).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:]), count_parameters(model)


def configure_maskrcnn(base: Configuration, fp: Fingerprint, instance_values: list[int], device: DeviceInfo,
                       run_s: float, num_classes: int, name: str = "2d_maskrcnn") -> tuple[Configuration, list[str]]:
    """A Mask R-CNN configuration beside the 2D one ``base`` (same spacing, normalization, patch, augmentation),
    sized to ``run_s`` seconds on ``device``."""
    sides = typical_object_px(fp, instance_values, base.spacing)
    max_instances = int(min(max(100, 2 * most_objects(fp, instance_values)), 1000))
    min_steps = budget.target_steps(run_s)
    dev = torch.device(device.type)
    candidates = [Candidate(network_for(base.patch_size, stem, fpn, sides, max_instances), base.patch_size, BATCH)
                  for stem, fpn in WIDTHS]
    half = [max(32, p // 2) for p in base.patch_size]
    if half != base.patch_size:
        candidates.append(Candidate(network_for(half, *WIDTHS[-1], sides, max_instances), half, BATCH))
    side = float(np.median(sides)) if sides else 8.0
    log, chosen, step_s, parameters = [], None, 0.0, 0
    for cand in candidates:
        divisor = 2 ** (len(cand.network.features) - 1)
        cand.patch = [max(divisor, p // divisor * divisor) for p in cand.patch]
        step_s, parameters = time_step(cand, fp.num_channels, num_classes, dev, side)
        fits = step_s * min_steps <= run_s
        log.append(f"{name}: stem {cand.network.features[0]}, pyramid {cand.network.fpn_channels}, patch "
                   f"{cand.patch}, batch {cand.batch}: {step_s:.3f} s/step measured ({'fits' if fits else 'over'} "
                   f"{min_steps} steps in {run_s:.0f} s)")
        chosen = cand
        if fits:
            break
    assert chosen is not None
    steps = max(1, int(run_s / max(step_s, 1e-6)))
    log.append(f"{name}: anchors {chosen.network.anchor_sizes} px from typical objects of "
               f"{', '.join(f'{s:.1f}' for s in sides) or 'unknown'} px; up to {max_instances} detections per image")
    cfg = replace(base, name=name, patch_size=chosen.patch, batch_size=chosen.batch, network=chosen.network,
                  loss=Loss(name="maskrcnn"), optimizer=Optimizer(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
                                                                  grad_clip=10.0),
                  schedule=replace(base.schedule, steps=steps, val_every=max(50, min(steps // 10, 1000)),
                                   warmup_steps=min(100, steps // 10)),
                  precision="fp32", channels_last=False, instances=Instances(method="detections"),
                  measured=Measurement(step_time_s=step_s, parameters=parameters))
    return cfg, log
