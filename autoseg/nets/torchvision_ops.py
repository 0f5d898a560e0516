"""Import torchvision on any torch build: where its compiled ops (``_C``) cannot load, define the two it needs
for Mask R-CNN (``torchvision::nms``, ``torchvision::roi_align``) in pure torch first.

Why: the torchvision wheel matching torch 2.13 is a CUDA build whose ``_C`` links libtorch_cuda; beside the CPU
torch build it does not load, and ``import torchvision`` then fails ("operator torchvision::nms does not exist")
because its Python side registers fake kernels for ops nobody defined. With a CUDA torch the compiled ops load
and nothing here is used. The fallbacks are plain torch: ``nms`` a greedy suppression over the IoU matrix,
``roi_align`` the kernel's sampling through ``grid_sample``, registered as a composite so autograd runs through
it (torchvision's own pure-torch ``_roi_align`` is ~10x slower eagerly, wants ``torch.compile`` and a compiler,
and misses the kernel's zero for samples far outside the map). The other compiled ops (roi_pool, deform_conv2d, ...) are left undefined: Mask R-CNN does not use them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it would unregister the fallbacks
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                  "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"),
}


def import_torchvision() -> ModuleType:
    """``import torchvision``, with the pure-torch fallbacks defined first where its compiled ops cannot load.

    Raises ModuleNotFoundError when torchvision is not installed (``pip install autoseg[instances]``)."""
    if "torchvision" in sys.modules and _LIBRARY is None:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("Mask R-CNN needs torchvision: pip install 'autoseg[instances]'")
    if _LIBRARY is None and not _compiled_ops_load(Path(spec.submodule_search_locations[0])):
        _define_fallbacks()
    torchvision = importlib.import_module("torchvision")
    if _LIBRARY is not None:
        _route_to_fallbacks(torchvision)
    return torchvision


def uses_fallbacks() -> bool:
    """Whether torchvision runs on the pure-torch ops of this module (its compiled ops did not load)."""
    return _LIBRARY is not None


def _compiled_ops_load(folder: Path) -> bool:
    libraries = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, ImportError):
        return False
    return hasattr(torch.ops.torchvision, "nms")


def _define_fallbacks() -> None:
    global _LIBRARY
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        library.define(schema)
    library.impl("nms", nms_reference, "CompositeExplicitAutograd")
    library.impl("qnms", _no_quantized_nms, "CompositeExplicitAutograd")
    library.impl("roi_align", _roi_align, "CompositeImplicitAutograd")
    _LIBRARY = library


def _route_to_fallbacks(torchvision: ModuleType) -> None:
    """torchvision decided at import that it has no ops (``_has_ops`` is False) and would refuse ``nms`` and
    reach for a compiled ``roi_align``; the ops exist now, so say so where it asks."""
    torchvision.extension._has_ops = _has_ops
    importlib.import_module("torchvision.ops.roi_align")._has_ops = _has_ops


def _has_ops() -> bool:
    return True


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with torchvision's semantics: boxes (x1, y1, x2, y2) in descending score
    order (ties by index), each dropping the later ones it overlaps with IoU > ``iou_threshold``; returns the
    kept indices, highest score first (int64)."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = dets[order].double()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lower = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    upper = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (upper - lower).clamp(min=0).prod(dim=2)
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu().numpy()
    suppressed = overlaps[0] & False
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def _no_quantized_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    raise NotImplementedError("quantized nms needs torchvision's compiled ops, which do not load beside this torch")


def _roi_align(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
               pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision's RoIAlign kernel (its CPU and CUDA code, sample for sample): each output bin the mean of a
    grid of bilinear samples, ``sampling_ratio`` per axis or, when <= 0, ``ceil(bin size)`` per box.

    The samples go through ``grid_sample`` (a native op forward and backward, ~10x faster than torchvision's
    eager transcription, which also lacks the kernel's zero for samples more than a pixel outside the map):
    border-clamped within a pixel of the map, zero beyond; boxes are grouped by their sampling grid."""
    channels = input.shape[1]
    out_dtype = input.dtype
    work = torch.promote_types(input.dtype, torch.float32)  # half precisions computed in float32, as the kernel
    features, rois = input.to(work), rois.to(work)
    out = features.new_zeros((rois.shape[0], channels, pooled_height, pooled_width))
    if rois.shape[0] == 0:
        return out.to(out_dtype)
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset  # (K, 2): x, y
    size = rois[:, 3:5] * spatial_scale - offset - start
    if not aligned:
        size = size.clamp(min=1.0)
    if sampling_ratio > 0:
        grids = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grids = torch.ceil(size / torch.tensor([pooled_width, pooled_height], device=size.device)).long()
    keys = grids[:, 0] * (1 << 20) + grids[:, 1]
    pieces, order = [], []
    for key in torch.unique(keys).tolist():
        chosen = (keys == key).nonzero()[:, 0]
        grid_x, grid_y = key >> 20, key & ((1 << 20) - 1)
        if grid_x == 0 or grid_y == 0:  # an empty box: no samples, zero
            continue
        pieces.append(_sampled(features, rois[chosen, 0].long(), start[chosen], size[chosen], pooled_height,
                               pooled_width, grid_y, grid_x))
        order.append(chosen)
    if pieces:
        out = out.index_put((torch.cat(order),), torch.cat(pieces))
    return out.to(out_dtype)


def _sampled(features: torch.Tensor, batch_index: torch.Tensor, start: torch.Tensor, size: torch.Tensor,
             pooled_height: int, pooled_width: int, grid_y: int, grid_x: int) -> torch.Tensor:
    """RoIAlign of boxes that share one sampling grid (``grid_y`` x ``grid_x`` samples per bin)."""
    channels, height, width = features.shape[1:]
    n = start.shape[0]
    steps_y = (torch.arange(pooled_height * grid_y, device=start.device, dtype=start.dtype) + 0.5) / grid_y
    steps_x = (torch.arange(pooled_width * grid_x, device=start.device, dtype=start.dtype) + 0.5) / grid_x
    ys = start[:, 1:2] + steps_y[None] * (size[:, 1:2] / pooled_height)  # (K, PH*gy)
    xs = start[:, 0:1] + steps_x[None] * (size[:, 0:1] / pooled_width)  # (K, PW*gx)
    inside = ((ys >= -1.0) & (ys <= height))[:, :, None] & ((xs >= -1.0) & (xs <= width))[:, None, :]
    norm_y = 2.0 * ys / max(height - 1, 1) - 1.0
    norm_x = 2.0 * xs / max(width - 1, 1) - 1.0
    points = torch.stack(torch.broadcast_tensors(norm_x[:, None, :], norm_y[:, :, None]), dim=-1)  # (K, Y, X, 2)
    order = torch.argsort(batch_index, stable=True)
    pieces = []
    for image in torch.unique(batch_index).tolist():
        chosen = order[batch_index[order] == image]
        k = chosen.numel()
        sampled = torch.nn.functional.grid_sample(
            features[image:image + 1], points[chosen].reshape(1, k * pooled_height * grid_y, pooled_width * grid_x, 2),
            mode="bilinear", padding_mode="border", align_corners=True)
        pieces.append(sampled.reshape(channels, k, pooled_height * grid_y, pooled_width * grid_x).transpose(0, 1))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)[torch.argsort(order)]
    out = out * inside[:, None].to(out.dtype)
    return out.reshape(n, channels, pooled_height, grid_y, pooled_width, grid_x).mean(dim=(3, 5))
