"""Resampling images, label maps and probabilities between voxel grids of 3 spatial axes (Z, Y, X).

All paths use the pixel-centre convention with edges replicated (torch ``align_corners=False``,
scipy ``grid_mode=True, mode="nearest"``, skimage ``resize``), which is nnU-Net's convention.

How, decided by ``benchmarks/resample.py`` (numbers in ``benchmarks/results/resample.md``):

- orders 0 and 1 run ``torch.nn.functional.interpolate`` (``nearest-exact``, ``trilinear``) on CPU: equal
  to ``scipy.ndimage.zoom`` within 1e-5 and several times faster;
- higher orders (3, the cubic B-spline of ``scipy.ndimage.zoom``, used for images) apply scipy's own 1D
  spline operator along each axis as a small dense matrix, one matmul per axis: the same result as
  ``scipy.ndimage.zoom`` within 1e-5, an order of magnitude faster. torch's bicubic is not a substitute:
  its Keys kernel (a = -0.75) errs some 40 times more than the B-spline on smooth data;
- a resampling that treats the out-of-plane axis separately (``Resampling.separate_z``, anisotropic data) is
  just a different order per axis: in-plane with the image (or label) order, ``z_axis`` with ``z_order``;
- labels are resampled one label at a time (indicator, linear, keep the label with the largest value), so
  memory stays at a few volumes whatever the number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autoseg.schema.plans import Resampling

_TORCH_MODES = {0: "nearest-exact", 1: "trilinear"}


def target_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    """Voxels per axis after resampling ``shape`` from ``spacing`` to ``new_spacing`` (same physical extent)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing)]


def axis_orders(order: int, resampling: Resampling) -> tuple[int, int, int]:
    """The interpolation order of each axis: ``order`` everywhere but the separate out-of-plane axis.

    ``z_axis`` None means axis 0, where ``Plans.axis_order`` puts the coarsest axis.
    """
    orders = [order] * 3
    if resampling.separate_z:
        orders[resampling.z_axis or 0] = resampling.z_order
    return orders[0], orders[1], orders[2]


@lru_cache(maxsize=64)
def _axis_matrix(old: int, new: int, order: int) -> torch.Tensor:
    """scipy's 1D resampling of ``old`` samples to ``new`` as a (new, old) matrix, built by resampling the
    identity: the spline prefilter and evaluation of ``ndimage.zoom`` folded into one linear map."""
    m = ndimage.zoom(np.eye(old), (new / old, 1.0), order=order, mode="nearest", grid_mode=True)
    assert m.shape == (new, old), (m.shape, new, old)
    return torch.from_numpy(m.astype(np.float32))


def _along_axis(x: torch.Tensor, axis: int, new: int, order: int) -> torch.Tensor:
    """Resample tensor ``x`` along one ``axis`` with order ``order`` (a matmul with the axis matrix)."""
    m = _axis_matrix(x.shape[axis], new, order)
    return (x.movedim(axis, -1) @ m.T).movedim(-1, axis)


def resize(x: np.ndarray, shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Resample the spatial axes of ``x`` (N, Z, Y, X) float32 to ``shape`` with an order per axis.

    Axes already at their size are left alone, so an unchanged shape returns the values unchanged.
    """
    shape = [int(s) for s in shape]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    for order in sorted(set(orders), reverse=True):
        axes = [a for a in range(3) if orders[a] == order and t.shape[a + 1] != shape[a]]
        if not axes:
            continue
        if order in _TORCH_MODES:
            size = [shape[a] if a in axes else t.shape[a + 1] for a in range(3)]
            t = F.interpolate(t[None], size=size, mode=_TORCH_MODES[order])[0]
        else:
            for a in axes:
                t = _along_axis(t, a + 1, shape[a], order)
    return t.contiguous().numpy()


def resample_image(data: np.ndarray, shape: Sequence[int], resampling: Resampling) -> np.ndarray:
    """Resample images (C, Z, Y, X) with ``image_order``; orders above 1 are clipped to each channel's input
    range, as nnU-Net (skimage ``resize(clip=True)``) does, so splines add no overshoot at edges."""
    orders = axis_orders(resampling.image_order, resampling)
    if list(data.shape[1:]) == list(shape):
        return data.astype(np.float32, copy=True)
    out = resize(data, shape, orders)
    if max(orders) > 1:
        for c in range(data.shape[0]):
            np.clip(out[c], data[c].min(), data[c].max(), out=out[c])
    return out


def resample_probabilities(probabilities: np.ndarray, shape: Sequence[int], resampling: Resampling) -> np.ndarray:
    """Resample per-class maps (K, Z, Y, X) with ``label_order`` (linear: no overshoot, sums stay 1).

    Call it on one class at a time (K = 1) to hold a single class at the target size.
    """
    if list(probabilities.shape[1:]) == list(shape):
        return probabilities.astype(np.float32, copy=True)
    return resize(probabilities, shape, axis_orders(resampling.label_order, resampling))


def resample_label(seg: np.ndarray, shape: Sequence[int], resampling: Resampling) -> np.ndarray:
    """Resample a label map (Z, Y, X): each label's indicator with ``label_order``, the largest wins (ties go
    to the lower label). Negative labels (the -1 outside the nonzero mask) are labels like any other."""
    if list(seg.shape) == list(shape):
        return seg.copy()
    orders = axis_orders(resampling.label_order, resampling)
    if max(orders) == 0:  # nearest neighbour needs no indicators; float32 holds labels exactly
        return resize(seg[None].astype(np.float32), shape, orders)[0].astype(seg.dtype)
    out = np.zeros(shape, seg.dtype)
    best = np.full(shape, -1.0, np.float32)
    for value in present_values(seg):
        score = resize((seg == value)[None].astype(np.float32), shape, orders)[0]
        better = score > best
        out[better] = value
        np.maximum(best, score, out=best)
    return out


def present_values(seg: np.ndarray) -> list[int]:
    """Label values present in ``seg``, ascending, in one O(n) pass (no sort, unlike np.unique)."""
    low = int(seg.min(initial=0))
    counts = np.bincount(seg.ravel().astype(np.int64) - low)
    return [int(v) + low for v in np.flatnonzero(counts)]
