"""Segmentation metrics per class. Convention: a class empty in both reference and prediction scores NaN
(excluded from means) rather than 1, so absent classes neither inflate nor deflate averages."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, r = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: list[int], ignore: int | None = None) -> dict[int, float]:
    """Dice for each label value in ``classes``; voxels labelled ``ignore`` in the reference are left out."""
    if ignore is not None:
        keep = ref != ignore
        pred, ref = pred[keep], ref[keep]
    return {c: dice(pred == c, ref == c) for c in classes}
