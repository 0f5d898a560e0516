"""Regions (BraTS-style overlapping labels, see :mod:`autoseg.schema.labels`) as arrays: an integer label map
turned into one mask per region for the loss, and region probabilities turned back into a label map.

The preprocessed cache keeps integer labels; a training target becomes region masks on the fly, one
comparison per region value, at each deep-supervision resolution (nearest-neighbour downsampling commutes
with the conversion, so downsampling the labels first is the same as downsampling every mask). A region
model's output is one sigmoid probability per region; a region is present where its probability, averaged
over folds, flips and ensemble members, exceeds :data:`THRESHOLD`, and the label map paints the present
regions in ``regions_class_order``, later over earlier.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

THRESHOLD = 0.5


def region_masks(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Integer labels ``(B, *spatial)`` -> boolean masks ``(B, R, *spatial)``, one per region."""
    masks = []
    for values in regions:
        m = target == values[0]
        for v in values[1:]:
            m = m | (target == v)
        masks.append(m)
    return torch.stack(masks, 1)


def present(summed: np.ndarray, members: int = 1) -> np.ndarray:
    """Where a region is present, from its probability summed over ``members`` (ensemble members): the mean
    above :data:`THRESHOLD`, compared as the sum against ``THRESHOLD * members`` (no division to round)."""
    return summed > THRESHOLD * members


def paint(seg: np.ndarray, summed: np.ndarray, value: int, members: int = 1) -> np.ndarray:
    """Paint ``value`` where the region of ``summed`` is present, over what ``seg`` holds (in place)."""
    seg[present(summed, members)] = value
    return seg


def regions_to_labels(summed: np.ndarray, order: Sequence[int], members: int = 1) -> np.ndarray:
    """Region probabilities ``(R, *spatial)`` (summed over ``members``) -> the label map painted in ``order``."""
    if len(order) != summed.shape[0]:
        raise ValueError(f"{summed.shape[0]} region maps, {len(order)} values in regions_class_order")
    seg = np.zeros(summed.shape[1:], np.uint8 if max(order, default=0) < 256 else np.uint16)
    for r, value in enumerate(order):
        paint(seg, summed[r], value, members)
    return seg


def labels_to_regions(seg: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """A label map -> its region masks ``(R, *spatial)`` (boolean): what a perfect region model predicts."""
    return np.stack([np.isin(seg, values) for values in regions])
