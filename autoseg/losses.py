"""Segmentation losses, looked up by the name plans.json stores in ``loss.name``.

Adding a loss is one decorated builder ``(loss_cfg) -> nn.Module`` whose module maps
``(logits float32 (B, C, *spatial), target int64 (B, *spatial) in 0..C-1, valid bool (B, *spatial) | None)``
to a scalar. :func:`build_loss` wraps it in :class:`SegmentationLoss`, which owns everything the terms share,
so each term stays a few lines::

    loss_fn = build_loss(Loss("dice_ce"), num_classes=3, ignore_label=3, deep_supervision_scales=4)
    loss = loss_fn(net(x), seg)  # a list of logits (full resolution first) or one tensor

Conventions (the same for every loss):

- Dice and Jaccard terms are ``1 - score``: a perfect prediction gives 0 and every loss is >= 0 (nnU-Net logs
  ``-dice`` instead; the gradients are the same). Background is left out of them (nnU-Net's ``do_bg=False``)
  because it dominates the volume; cross-entropy and focal include it. Smoothing is 1e-5.
- Target value -1 means background: preprocessing marks background outside the nonzero mask -1 (nnU-Net's
  convention), so every negative value is read as 0. Voxels equal to ``ignore_label`` contribute nothing:
  they are masked out of the Dice/Jaccard sums and out of the cross-entropy/focal means.
- Logits are cast to float32 and autocast is switched off inside the loss: bf16/fp16 softmax and sums over
  a whole patch lose too much precision (or overflow).
- Regions (``dice_bce``, the loss of region datasets): the network has one sigmoid output per region, and
  the term gets the target as region masks ``float (B, R, *spatial)`` (:func:`autoseg.regions.region_masks`
  of the cleaned labels at each output's resolution) instead of class indices; the ignore mask is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoseg.regions import region_masks
from autoseg.schema.plans import LOSS_NAMES, REGION_LOSSES, Loss
from autoseg.schema.registry import Registry

LossBuilder = Callable[[Loss], nn.Module]
LOSSES: Registry[LossBuilder] = Registry("loss", LOSS_NAMES)
SMOOTH = 1e-5
TOPK_SHARE = 0.1  # the TopK loss averages cross-entropy over the hardest 10 % of voxels (nnU-Net's k)
FOCAL_GAMMA = 2.0
MODEL_LOSSES = {"maskrcnn"}  # networks that return their own loss terms (``model(images, target)``)


def build_loss(cfg: Loss, num_classes: int, ignore_label: int | None = None,
               deep_supervision_scales: int = 1, regions: Sequence[Sequence[int]] = ()) -> nn.Module:
    """The loss a plan describes; ``num_classes`` is the network's output channels (background counted;
    regions: one per region, no background), ``deep_supervision_scales`` the number of outputs the network
    returns in training, ``regions`` the label values of each region (region losses only)."""
    if cfg.name in REGION_LOSSES:
        if len(regions) != num_classes or not regions:
            raise ValueError(f"'{cfg.name}' needs one region per output: {num_classes} outputs, {len(regions)} regions")
    elif regions:
        raise ValueError(f"regions train with a region loss ({', '.join(sorted(REGION_LOSSES))}), not '{cfg.name}'")
    elif num_classes < 2:
        raise ValueError(f"num_classes counts background and must be >= 2, got {num_classes}")
    builder = LOSSES[cfg.name]
    if cfg.name in MODEL_LOSSES:  # the network computes its own losses from the target
        return builder(cfg)
    weights = deep_supervision_weights(deep_supervision_scales, cfg.ds_weights)
    return SegmentationLoss(builder(cfg), num_classes, ignore_label, weights, regions)


class InteriorLoss(nn.Module):
    """The touching-object formulation's loss: the segmentation loss on the class outputs (every
    deep-supervision scale) plus ``weight`` times binary cross-entropy of the extra output, at full
    resolution, against each object's interior (:func:`autoseg.instances.interior_map`: 1 at an object's
    centre, falling to 0 at its border and outside), per voxel weighted by ``weight`` where given (the loader's
    contact zones). The network's outputs are the ``num_classes`` class logits and then the interior logit."""

    def __init__(self, segmentation: nn.Module, num_classes: int, weight: float = 1.0, seed_dice: bool = False,
                 threshold: float = 0.5):
        super().__init__()
        self.segmentation, self.num_classes, self.weight = segmentation, num_classes, float(weight)
        self.seed_dice, self.threshold = bool(seed_dice), float(threshold)

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor, interior: Tensor,
                weight: Tensor | None = None) -> Tensor:
        outputs = [logits] if isinstance(logits, Tensor) else list(logits)
        if outputs[0].shape[1] != self.num_classes + 1:
            raise ValueError(f"logits have {outputs[0].shape[1]} channels, expected {self.num_classes} classes "
                             "and the interior")
        classes = [o[:, :self.num_classes] for o in outputs]
        seg = self.segmentation(classes[0] if isinstance(logits, Tensor) else classes, target)
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            extra = F.binary_cross_entropy_with_logits(outputs[0][:, self.num_classes].float(), interior.float(),
                                                       reduction="none" if weight is not None else "mean")
            if weight is not None:  # a weighted mean: the contact zones count more, the scale stays the same
                extra = (extra * weight).sum() / weight.sum()
            if self.seed_dice:
                extra = extra + seed_dice_loss(outputs[0][:, self.num_classes].float(), interior.float() > self.threshold)
        return seg + self.weight * extra


def seed_dice_loss(logit: Tensor, seeds: Tensor, smooth: float = 1e-5) -> Tensor:
    """1 - soft Dice of sigmoid(logit) against the seed mask (interior above the watershed's threshold), over
    the whole batch: the seeds are a small share of each patch, which a voxel-mean loss barely sees."""
    p = torch.sigmoid(logit)
    t = seeds.to(p.dtype)
    return 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def deep_supervision_weights(n: int, scheme: str = "halving") -> list[float]:
    """Weights of ``n`` outputs, full resolution first: 1, 1/2, 1/4, ... normalized to sum 1. With more than
    two outputs the coarsest gets 0, as in nnU-Net: it is too coarse to say anything about thin structures."""
    if scheme != "halving":
        raise ValueError(f"unknown deep-supervision weighting '{scheme}' (known: halving)")
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    w = [0.5**i for i in range(n)]
    if n > 2:
        w[-1] = 0.0
    return [x / sum(w) for x in w]


def downsample_target(target: Tensor, shape: Sequence[int]) -> Tensor:
    """Nearest-neighbour target (B, *spatial) at ``shape`` (nnU-Net's order 0): strided indexing when the
    ratio is an integer per axis (no copy), else ``F.interpolate(mode="nearest")``, which picks the same
    voxels, floor(i * in / out)."""
    src, shape = tuple(target.shape[1:]), tuple(int(s) for s in shape)
    if src == shape:
        return target
    if all(a % b == 0 for a, b in zip(src, shape)):
        return target[(slice(None), *(slice(None, None, a // b) for a, b in zip(src, shape)))]
    return F.interpolate(target[:, None].float(), size=shape, mode="nearest")[:, 0].to(target.dtype)


class SegmentationLoss(nn.Module):
    """Applies one loss term to one output or to each deep-supervision output with its weight.

    Owns what every term shares: -1 read as background, the ignore mask, the target resampled to each
    output's shape, float32 outside autocast. Zero-weighted outputs are still evaluated (at the coarsest
    resolution this is cheap) so every head stays in the autograd graph and DDP needs no
    ``find_unused_parameters``. A single tensor (the network in eval mode) is scored at weight 1.
    """

    def __init__(self, term: nn.Module, num_classes: int, ignore_label: int | None, weights: list[float],
                 regions: Sequence[Sequence[int]] = ()):
        super().__init__()
        self.term, self.num_classes, self.ignore_label = term, num_classes, ignore_label
        self.weights = list(weights)
        self.regions = [list(r) for r in regions]

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        outputs = [logits] if isinstance(logits, Tensor) else list(logits)
        weights = self.weights if len(outputs) > 1 else [1.0]
        if len(outputs) != len(weights):
            raise ValueError(f"the network returned {len(outputs)} outputs, the loss was built for "
                             f"{len(self.weights)} deep-supervision scales")
        if outputs[0].shape[1] != self.num_classes:
            raise ValueError(f"logits have {outputs[0].shape[1]} channels, expected {self.num_classes}")
        if target.ndim == outputs[0].ndim:  # (B, 1, *spatial) as loaders often give it
            target = target[:, 0]
        total = outputs[0].new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=outputs[0].device.type, enabled=False):
            for out, w in zip(outputs, weights):
                t, valid = self._clean(downsample_target(target, out.shape[2:]))
                if self.regions:
                    t = region_masks(t, self.regions).float()
                total = total + w * self.term(out.float(), t, valid)
        return total

    def _clean(self, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """Class indices in 0..C-1 (ignored and negative voxels set to 0) and the mask of voxels that count."""
        target = target.long()
        valid = None
        if self.ignore_label is not None:
            valid = target != self.ignore_label
            target = target.masked_fill(~valid, 0)
        return target.clamp_min(0), valid


def one_hot(target: Tensor, num_classes: int) -> Tensor:
    """(B, *spatial) indices -> float (B, C, *spatial), by comparison (no host sync, unlike F.one_hot)."""
    classes = torch.arange(num_classes, device=target.device).view(1, -1, *([1] * (target.ndim - 1)))
    return (target[:, None] == classes).float()


def overlap_scores(probs: Tensor, onehot: Tensor, valid: Tensor | None, batch: bool,
                   jaccard: bool = False, smooth: float = SMOOTH, background: bool = False) -> Tensor:
    """Soft Dice (or Jaccard) of each foreground class: (B, C-1), or (C-1,) when ``batch`` sums the
    batch before the ratio (batch Dice: a sample without a class does not score 0 for it alone).
    ``background``: score channel 0 too (regions, where every channel is a foreground region)."""
    if not background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    if valid is not None:
        probs, onehot = probs * valid[:, None], onehot * valid[:, None]
    axes = [0, *range(2, probs.ndim)] if batch else list(range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)
    total = probs.sum(axes) + onehot.sum(axes)
    denom = total - inter if jaccard else total
    return ((1 if jaccard else 2) * inter + smooth) / (denom + smooth).clamp_min(1e-8)


def _masked_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return x.mean()
    return (x * valid).sum() / valid.sum().clamp_min(1)


class SoftOverlapLoss(nn.Module):
    """``1 - mean soft Dice`` (or Jaccard) over foreground classes."""

    def __init__(self, batch: bool, jaccard: bool = False):
        super().__init__()
        self.batch, self.jaccard = batch, jaccard

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        probs = logits.softmax(1)
        scores = overlap_scores(probs, one_hot(target, logits.shape[1]), valid, self.batch, self.jaccard)
        return 1 - scores.mean()


class CrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over the voxels that count (all classes, background included)."""

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return _masked_mean(F.cross_entropy(logits, target, reduction="none"), valid)


class FocalLoss(nn.Module):
    """``-(1 - p_t)^gamma log p_t`` averaged over the voxels that count: easy voxels weigh less, so
    small structures are not drowned by the background (Lin et al. 2017; no alpha)."""

    def __init__(self, gamma: float = FOCAL_GAMMA):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        logp = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
        return _masked_mean(-((1 - logp.exp()) ** self.gamma) * logp, valid)


class TopKCrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over the ``k`` share of counted voxels where it is largest (nnU-Net's TopK loss):
    the voxels a network gets wrong, a small class's among them, carry the gradient instead of the sea of
    background it already gets right."""

    def __init__(self, k: float = TOPK_SHARE):
        super().__init__()
        self.k = k

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        ce = F.cross_entropy(logits, target, reduction="none")
        if valid is not None:
            ce = ce[valid]
        ce = ce.reshape(-1)
        n = max(1, int(ce.numel() * self.k))
        return ce.topk(n, sorted=False).values.mean() if ce.numel() else ce.sum()


class RegionDiceBCELoss(nn.Module):
    """Binary cross-entropy plus ``1 - mean soft Dice`` of each region's sigmoid (nnU-Net's DC_and_BCE_loss):
    regions overlap, so each output answers its own yes/no question. BCE is averaged over the counted voxels
    and regions; the Dice terms include every channel (each is a foreground region). ``target`` is the
    region masks, float (B, R, *spatial)."""

    def __init__(self, batch: bool):
        super().__init__()
        self.batch = batch

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        scores = overlap_scores(logits.sigmoid(), target, valid, self.batch, background=True)
        return _masked_mean(bce, valid) + 1 - scores.mean()


class SumLoss(nn.Module):
    """Unweighted sum of terms (Dice + CE, focal + Dice)."""

    def __init__(self, *terms: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
        return sum((t(logits, target, valid) for t in self.terms), logits.new_zeros(()))


@LOSSES.register("dice_ce")
def _dice_ce(cfg: Loss) -> nn.Module:
    return SumLoss(SoftOverlapLoss(cfg.batch_dice), CrossEntropyLoss())


@LOSSES.register("dice")
def _dice(cfg: Loss) -> nn.Module:
    return SoftOverlapLoss(cfg.batch_dice)


@LOSSES.register("jaccard")
def _jaccard(cfg: Loss) -> nn.Module:
    return SoftOverlapLoss(cfg.batch_dice, jaccard=True)


@LOSSES.register("ce")
def _ce(cfg: Loss) -> nn.Module:
    return CrossEntropyLoss()


@LOSSES.register("focal")
def _focal(cfg: Loss) -> nn.Module:
    return FocalLoss()


@LOSSES.register("focal_dice")
def _focal_dice(cfg: Loss) -> nn.Module:
    return SumLoss(FocalLoss(), SoftOverlapLoss(cfg.batch_dice))


@LOSSES.register("dice_topk")
def _dice_topk(cfg: Loss) -> nn.Module:
    return SumLoss(SoftOverlapLoss(cfg.batch_dice), TopKCrossEntropyLoss())


@LOSSES.register("dice_bce")
def _dice_bce(cfg: Loss) -> nn.Module:
    return RegionDiceBCELoss(cfg.batch_dice)


class LossDictSum(nn.Module):
    """The sum of the loss terms a network returns itself (Mask R-CNN: RPN objectness and boxes, class, box, mask)."""

    def forward(self, terms: dict[str, Tensor], target: Tensor | None = None) -> Tensor:
        return sum(terms.values(), next(iter(terms.values())).new_zeros(()))


@LOSSES.register("maskrcnn")
def _maskrcnn(cfg: Loss) -> nn.Module:
    return LossDictSum()
