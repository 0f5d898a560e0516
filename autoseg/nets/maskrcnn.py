"""Mask R-CNN (torchvision's implementation) as a 2D network family, randomly initialised, configured by plans.json.

Why: touching objects (nuclei, cells) merge into one blob in a semantic map; Mask R-CNN predicts each object as
its own box and mask. torchvision is an optional dependency (``pip install 'autoseg[instances]'``), imported on
first use through :mod:`autoseg.nets.torchvision_ops` (which makes it run beside a CPU torch build).

The plan's ``Network`` describes it as data: ``features`` / ``strides`` / ``blocks_per_stage`` the residual
backbone (a stem at full resolution, then one stage per stride), ``fpn_channels`` the feature pyramid's width
(over every stage after the stem), ``anchor_sizes`` one anchor size per pyramid level plus the pooled level (in
pixels at the planned spacing: the planner derives them from the objects' sizes in the fingerprint), and
``max_instances`` the detections kept per image.

One module, three uses:
- training: ``model(images, target)`` with the semantic patch ``(B, Y, X)``; its objects are the connected
  components of each class (what the instance format says when a dataset has no ``instancesTr/``), and the
  result is torchvision's loss dict (the ``maskrcnn`` loss sums it);
- the inference engine and the patch validation: ``model(images)`` in eval mode returns log-probabilities
  ``(B, K, Y, X)`` painted from the detections (per class the highest score x mask probability, background the
  rest), so the sliding window, fold averaging, out-of-fold selection and bundle work as for any family;
- instances: :meth:`InstanceSegmenter.detect` gives each image's detections, and :func:`vote_instances` merges
  the folds' detections into one instance map (mask voting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from autoseg.errors import UserError
from autoseg.nets.registry import NETWORKS
from autoseg.schema.plans import Network

MASK_THRESHOLD = 0.5  # a detection's soft mask -> its pixels
VOTE_IOU = 0.5  # two folds' detections of one class with mask IoU above this are one object
DEFAULT_MAX_INSTANCES = 300


def _norm(channels: int) -> nn.Module:
    return nn.GroupNorm(max(1, channels // 8), channels)  # batch sizes of 2-8: no batch statistics


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class _Backbone(nn.Module):
    """Stem at full resolution, then residual stages; returns the stages after the stem by name ("0", "1", ...)."""

    def __init__(self, cfg: Network, in_channels: int):
        super().__init__()
        f, blocks = cfg.features, cfg.blocks_per_stage or [1] * len(cfg.features)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, f[0], 3, 1, 1, bias=False), _norm(f[0]), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        for i in range(1, len(f)):
            stride = int(cfg.strides[i][0])
            layers = [_ResidualBlock(f[i - 1], f[i], stride)] + [_ResidualBlock(f[i], f[i], 1)
                                                                  for _ in range(blocks[i] - 1)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x, out = self.stem(x), {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out


class _BackboneWithFPN(nn.Module):
    def __init__(self, cfg: Network, in_channels: int):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = _Backbone(cfg, in_channels)
        self.fpn = FeaturePyramidNetwork(list(cfg.features[1:]), cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = cfg.fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def check_config(cfg: Network, ndim: int) -> None:
    levels = len(cfg.features) - 1
    if ndim != 2:
        raise UserError(f"network family maskrcnn is 2D only; this configuration is {ndim}D")
    if levels < 1:
        raise UserError("network.features: Mask R-CNN needs a stem and at least one stage")
    if cfg.fpn_channels < 1:
        raise UserError("network.fpn_channels: Mask R-CNN needs the feature pyramid's width (> 0)")
    if len(cfg.anchor_sizes) != levels + 1:
        raise UserError(f"network.anchor_sizes: expected {levels + 1} sizes (one per pyramid level and the pooled "
                        f"one), got {len(cfg.anchor_sizes)}")


class InstanceSegmenter(nn.Module):
    """torchvision's ``MaskRCNN`` on images that are already normalised and sized by the plan (no resizing)."""

    trains_on_targets = True  # the trainer calls ``model(images, target)`` and gets the loss dict

    def __init__(self, cfg: Network, in_channels: int, num_classes: int):
        super().__init__()
        check_config(cfg, 2)
        from autoseg.nets.torchvision_ops import import_torchvision

        try:
            import_torchvision()
        except ModuleNotFoundError as e:  # a bundle or plan with a Mask R-CNN on a machine without the extra
            raise UserError(f"network family maskrcnn: {e}") from None
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        levels = len(cfg.features)  # the stages after the stem and the pooled level
        total_stride = int(np.prod([s[0] for s in cfg.strides]))
        width = cfg.fpn_channels
        self.num_classes = num_classes
        self.detector = MaskRCNN(
            _BackboneWithFPN(cfg, in_channels), num_classes=None,
            rpn_anchor_generator=AnchorGenerator(tuple((int(a),) for a in cfg.anchor_sizes),
                                                 ((0.5, 1.0, 2.0),) * levels),
            box_head=TwoMLPHead(width * 7 * 7, 4 * width), box_predictor=FastRCNNPredictor(4 * width, num_classes),
            mask_head=MaskRCNNHeads(width, [width] * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, num_classes),
            min_size=1, max_size=1 << 20, image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels,
            size_divisible=total_stride, box_detections_per_img=cfg.max_instances or DEFAULT_MAX_INSTANCES,
            rpn_batch_size_per_image=128, box_batch_size_per_image=128,
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=500)
        self.detector.transform.resize = _keep_size  # the plan sized the images; torchvision would rescale them

    def forward(self, images: torch.Tensor, target: torch.Tensor | None = None, instances: torch.Tensor | None = None):
        if self.training and target is not None:
            return self.detector(list(images), targets_from_labels(target, self.num_classes, instances))
        return semantic_log_probabilities(self.detect(images), self.num_classes, images.shape[-2:])

    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """torchvision's detections per image: ``boxes`` (x1, y1, x2, y2), ``labels``, ``scores``, ``masks``
        ``(N, 1, Y, X)`` soft masks at the image's size."""
        was_training = self.training
        self.detector.eval()
        try:
            return self.detector([im.float() for im in images])
        finally:
            self.detector.train(was_training)


def _keep_size(image: torch.Tensor, target: dict | None = None):
    return image, target


@NETWORKS.register("maskrcnn")
def build_maskrcnn(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    check_config(cfg, ndim)
    return InstanceSegmenter(cfg, in_channels, num_classes)


def objects_of(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The objects of a 2D label map: connected components (full connectivity) of each class 1..K-1, as
    ``(masks (N, Y, X) uint8, classes (N,))``; ignore and out-of-range values are no object."""
    masks, classes = [], []
    for c in range(1, num_classes):
        comps, n = ndimage.label(labels == c, structure=np.ones((3, 3), bool))
        for i in range(1, n + 1):
            masks.append(comps == i)
            classes.append(c)
    if not masks:
        return np.zeros((0, *labels.shape), np.uint8), np.zeros(0, np.int64)
    return np.stack(masks).astype(np.uint8), np.asarray(classes, np.int64)


def objects_of_instances(labels: np.ndarray, instances: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The objects of a 2D instance map: one per id, its class the label most of its pixels carry (one label, in
    a valid dataset); ids on background or out-of-range labels are no object."""
    masks, classes = [], []
    for i in np.unique(instances[instances > 0]):
        mask = instances == i
        values, counts = np.unique(labels[mask], return_counts=True)
        c = int(values[np.argmax(counts)])
        if 0 < c < num_classes:
            masks.append(mask)
            classes.append(c)
    if not masks:
        return np.zeros((0, *labels.shape), np.uint8), np.zeros(0, np.int64)
    return np.stack(masks).astype(np.uint8), np.asarray(classes, np.int64)


def targets_from_labels(target: torch.Tensor, num_classes: int, instances: torch.Tensor | None = None
                        ) -> list[dict[str, torch.Tensor]]:
    """torchvision's targets (boxes, labels, masks per image) from a batch of semantic patches ``(B, Y, X)``: the
    instance map's objects where the dataset has one (touching objects stay apart), else connected components."""
    labels_batch = target.reshape(target.shape[0], *target.shape[-2:]).cpu().numpy()
    inst_batch = (instances.reshape(instances.shape[0], *instances.shape[-2:]).cpu().numpy()
                  if instances is not None else [None] * len(labels_batch))
    out = []
    for labels, inst in zip(labels_batch, inst_batch):
        masks, classes = (objects_of(labels, num_classes) if inst is None
                          else objects_of_instances(labels, inst, num_classes))
        boxes = np.zeros((len(masks), 4), np.float32)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        out.append({"boxes": torch.from_numpy(boxes).to(target.device),
                    "labels": torch.from_numpy(classes).to(target.device),
                    "masks": torch.from_numpy(masks).to(target.device)})
    return out


def semantic_log_probabilities(detections: list[dict[str, torch.Tensor]], num_classes: int,
                               size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Per image and class, the highest ``score x mask probability`` of its detections; background 1 minus the
    highest of those; normalised and as logarithms (the engine's softmax gives the probabilities back)."""
    maps = []
    for det in detections:
        device = det["scores"].device
        probs = torch.zeros((num_classes, *size), device=device)
        weighted = det["masks"][:, 0].float() * det["scores"][:, None, None].float()
        for c in range(1, num_classes):
            chosen = det["labels"] == c
            if chosen.any():
                probs[c] = weighted[chosen].amax(0)
        probs[0] = 1.0 - probs[1:].amax(0) if num_classes > 1 else 1.0
        probs = probs.clamp(min=1e-4)
        maps.append(torch.log(probs / probs.sum(0, keepdim=True)))
    return torch.stack(maps)


@dataclass
class Detection:
    """One object of one fold: its class, score and soft mask (float32, the image's size)."""

    label: int
    score: float
    mask: np.ndarray
    fold: int


def vote_instances(per_fold: list[list[Detection]], min_score: float = 0.5) -> tuple[np.ndarray, list[dict]]:
    """Merge the folds' detections into one instance map by mask voting.

    Detections are taken by descending score; each joins the first cluster of its class whose mask overlaps its
    own with IoU > :data:`VOTE_IOU` and that holds no detection of its fold yet, or starts a cluster. A cluster is
    an object when its summed score over the number of folds (a fold that missed it counts 0) reaches
    ``min_score``; its mask is where the folds' mean soft mask (again 0 for a missing fold) passes
    :data:`MASK_THRESHOLD`. Objects are painted from the highest score down, each on the pixels still free.
    Returns the instance map (ids 1..N, int32) and per id its class and mean score."""
    folds = max(len(per_fold), 1)
    clusters: list[dict] = []
    everything = sorted((d for dets in per_fold for d in dets), key=lambda d: -d.score)
    for d in everything:
        binary = d.mask > MASK_THRESHOLD
        box = _box(binary)
        for c in clusters:
            if c["label"] != d.label or d.fold in c["folds"] or not _overlap(box, c["box"]):
                continue
            crop = tuple(slice(min(a, b), max(e, f)) for a, e, b, f in zip(box[0], box[1], c["box"][0], c["box"][1]))
            inter = np.logical_and(binary[crop], c["binary"][crop]).sum()
            union = np.logical_or(binary[crop], c["binary"][crop]).sum()
            if union and inter / union > VOTE_IOU:
                c["folds"].add(d.fold)
                c["score"] += d.score
                c["mask"] += d.mask
                break
        else:
            clusters.append({"label": d.label, "folds": {d.fold}, "score": d.score, "mask": d.mask.astype(np.float32),
                             "binary": binary, "box": box})
    shape = everything[0].mask.shape if everything else (0, 0)
    instance_map = np.zeros(shape, np.int32)
    objects: list[dict] = []
    for c in sorted(clusters, key=lambda c: -c["score"]):
        score = c["score"] / folds
        if score < min_score:
            continue
        pixels = (c["mask"] / folds > MASK_THRESHOLD) & (instance_map == 0)
        if not pixels.any():
            continue
        objects.append({"label": c["label"], "score": float(score)})
        instance_map[pixels] = len(objects)
    return instance_map, objects


def _box(binary: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Lower and upper (exclusive) corner of a mask's pixels; an empty box for an empty mask."""
    if not binary.any():
        return (0,) * binary.ndim, (0,) * binary.ndim
    where = [np.nonzero(binary.any(axis=tuple(a for a in range(binary.ndim) if a != k)))[0] for k in range(binary.ndim)]
    return tuple(int(w[0]) for w in where), tuple(int(w[-1]) + 1 for w in where)


def _overlap(a: tuple, b: tuple) -> bool:
    return all(lo1 < hi2 and lo2 < hi1 for lo1, hi1, lo2, hi2 in zip(a[0], a[1], b[0], b[1]))


def detections_of(model: InstanceSegmenter, image: torch.Tensor, fold: int) -> list[Detection]:
    """One fold's detections of one preprocessed 2D image ``(C, Y, X)``, as :class:`Detection` records."""
    with torch.inference_mode():
        det = model.detect(image[None])[0]
    masks = det["masks"][:, 0].float().cpu().numpy()
    return [Detection(int(label), float(score), mask, fold)
            for label, score, mask in zip(det["labels"].tolist(), det["scores"].tolist(), masks)]
