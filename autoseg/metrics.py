"""Segmentation metrics per class: overlap (Dice, IoU, sensitivity, specificity, precision), surface
(HD95, NSD) and volumes, all in physical units from the voxel spacing (anisotropic spacing included).

Conventions, one rule for every ratio: **a ratio whose denominator is zero is NaN** (NaN is left out of
means and counted instead). What that gives for the empty cases:

============================  =====================  ===========  ===========  =========  ======
reference / prediction        Dice, IoU, NSD         sensitivity  precision    HD95       empty
============================  =====================  ===========  ===========  =========  ======
both empty                    NaN                    NaN          NaN          NaN        "both"
reference empty, pred. not    0                      NaN          0            NaN        "ref"
reference not, pred. empty    0                      0            NaN          NaN        "pred"
============================  =====================  ===========  ===========  =========  ======

Specificity is TN / (TN + FP), NaN only when the class fills every scored voxel. "Both empty" scores NaN
(as nnU-Net's Dice does) rather than 1, so a class absent from a case neither inflates nor deflates means;
HD95 is undefined without two surfaces and is NaN rather than inf, so means stay finite and the cases are
counted ("ref" = false-positive cases, "pred" = missed cases).

Surfaces are the mask's border voxels (the mask minus its erosion by the connectivity-1 structure; outside
the image counts as background). Surface distances are exact Euclidean distances in mm
(``distance_transform_edt`` with ``sampling=spacing``) from each border voxel of one mask to the nearest
border voxel of the other.

- **HD95** is the 95th percentile (linear interpolation) of the *union* of both directed distance sets,
  the convention of ``medpy.metric.binary.hd95`` (MONAI instead takes the larger of the two directed 95th
  percentiles, which is never smaller).
- **NSD** (normalized surface Dice, Nikolov et al. 2021, counted on border voxels as MONAI's
  ``compute_surface_dice`` does) is the fraction of both border-voxel sets that lie within the tolerance
  ``tau`` mm of the other surface: ``(|{d_pr <= tau}| + |{d_rp <= tau}|) / (|S_pred| + |S_ref|)``.
  The default ``tau`` is the case's largest voxel spacing: a one-voxel disagreement along the coarsest
  axis is tolerated, one voxel and more beyond it is not.

Voxels labelled ``ignore`` in the reference are left out of every metric: they are neither reference nor
prediction (the prediction there is cleared) nor true negatives.

Each class is cropped to the bounding box of prediction | reference (plus one voxel, which keeps the
erosion exact; the distance transform is exact on any box that holds both surfaces) before the distance
transforms, so a small structure in a large image costs little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

NAN = float("nan")
TIE = 1e-9  # relative slack of the NSD tolerance for distances that equal it up to rounding
MARGIN = 1  # voxels around a class's box: enough for an exact erosion at the box's edge
SCORES = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "nsd")
VOLUMES = ("volume_ref_mm3", "volume_pred_mm3")
COUNTS = ("tp", "fp", "fn", "tn")

LabelSpec = Mapping[str, int | Sequence[int]] | Sequence[int]
Tolerance = float | Mapping[str, float] | None


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, r = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int | tuple[int, ...]],
                   ignore: int | None = None) -> dict:
    """Dice for each label value in ``classes`` (a tuple of values: their union, a region); voxels labelled
    ``ignore`` in the reference are left out."""
    if ignore is not None:
        keep = ref != ignore
        pred, ref = pred[keep], ref[keep]
    return {c: dice(np.isin(pred, c), np.isin(ref, c)) if isinstance(c, tuple) else dice(pred == c, ref == c)
            for c in classes}


# --- surfaces --------------------------------------------------------------------------------------------


def border(mask: np.ndarray) -> np.ndarray:
    """The mask's border voxels: those with a face neighbour outside the mask (or outside the image)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each pred border voxel -> ref surface, each ref border voxel -> pred
    surface). Both masks must be non-empty."""
    bp, br = border(pred.astype(bool, copy=False)), border(ref.astype(bool, copy=False))
    sampling = np.asarray(spacing, dtype=np.float64)
    d_pr = ndimage.distance_transform_edt(~br, sampling=sampling)[bp]
    d_rp = ndimage.distance_transform_edt(~bp, sampling=sampling)[br]
    return d_pr, d_rp


def hd95_from_distances(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    """95th percentile of the union of both directed distance sets (medpy's convention)."""
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


def nsd_from_distances(d_pr: np.ndarray, d_rp: np.ndarray, tolerance: float) -> float:
    """Fraction of both border-voxel sets within ``tolerance`` mm of the other surface; a distance equal to
    the tolerance counts as within, also when rounding put it a hair above (e.g. 3 x 0.7 mm vs 2.1 mm)."""
    tolerance = tolerance * (1 + TIE)
    return float((np.count_nonzero(d_pr <= tolerance) + np.count_nonzero(d_rp <= tolerance)) / (d_pr.size + d_rp.size))


# --- one class -------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return num / den if den else NAN


def _scores(tp: int, fp: int, fn: int, tn: int, voxel_mm3: float) -> dict:
    """Overlap scores and volumes from the confusion counts; surface scores are filled in by the caller."""
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
            "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp), "precision": _ratio(tp, tp + fp),
            "hd95_mm": NAN, "nsd": NAN,
            "volume_ref_mm3": (tp + fn) * voxel_mm3, "volume_pred_mm3": (tp + fp) * voxel_mm3,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "empty": "both" if tp + fp + fn == 0 else "ref" if tp + fn == 0 else "pred" if tp + fp == 0 else None}


def empty_class_metrics(n_scored: int, spacing: Sequence[float], tolerance: float | None = None) -> dict:
    """The metrics of a class absent from both prediction and reference of an image of ``n_scored`` voxels."""
    out = _scores(0, 0, 0, n_scored, float(np.prod(spacing)))
    out["nsd_tolerance_mm"] = float(max(spacing) if tolerance is None else tolerance)
    return out


def _box_metrics(p: np.ndarray, r: np.ndarray, n_scored: int, spacing: Sequence[float], tolerance: float) -> dict:
    """Metrics of one class from masks cropped to a box that holds both; voxels outside it are true negatives."""
    tp = int(np.count_nonzero(p & r))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(r)) - tp
    out = _scores(tp, fp, fn, n_scored - tp - fp - fn, float(np.prod(spacing)))
    out["nsd_tolerance_mm"] = float(tolerance)
    if tp + fp and tp + fn:
        d_pr, d_rp = surface_distances(p, r, spacing)
        out["hd95_mm"] = hd95_from_distances(d_pr, d_rp)
        out["nsd"] = nsd_from_distances(d_pr, d_rp, tolerance)
    elif tp + fp + fn:
        out["nsd"] = 0.0  # one surface only: none of its voxels has a partner within any tolerance
    return out


def _grow(box: tuple[slice, ...], shape: tuple[int, ...], margin: int = MARGIN) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: list[tuple[slice, ...] | None]) -> tuple[slice, ...] | None:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance: float | None = None,
                   scored: np.ndarray | None = None) -> dict:
    """Every metric of one class given as two boolean masks; ``scored`` (optional) masks the voxels that count."""
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    if scored is not None:
        pred, ref = pred & scored, ref & scored
    n_scored = pred.size if scored is None else int(np.count_nonzero(scored))
    tolerance = float(max(spacing)) if tolerance is None else float(tolerance)
    box = ndimage.find_objects((pred | ref).astype(np.uint8))
    if not box:
        return empty_class_metrics(n_scored, spacing, tolerance)
    box = _grow(box[0], pred.shape)
    return _box_metrics(pred[box], ref[box], n_scored, spacing, tolerance)


# --- a label map -----------------------------------------------------------------------------------------


def normalize_labels(labels: LabelSpec) -> dict[str, tuple[int, ...]]:
    """``{name: value or [values]}`` or a list of values (named by their value) -> ``{name: (values,)}``."""
    if isinstance(labels, Mapping):
        return {str(k): tuple(int(x) for x in v) if isinstance(v, Sequence) else (int(v),) for k, v in labels.items()}
    return {str(int(v)): (int(v),) for v in labels}


def resolve_tolerances(nsd_tolerance: Tolerance, names: Sequence[str], spacing: Sequence[float]) -> dict[str, float]:
    """NSD tolerance (mm) per class: one number for all, or ``{name: mm}`` with an optional ``"default"`` key;
    classes left unset get the largest voxel spacing."""
    fallback = float(max(spacing))
    if nsd_tolerance is None or isinstance(nsd_tolerance, (int, float)):
        out = dict.fromkeys(names, fallback if nsd_tolerance is None else float(nsd_tolerance))
    else:
        unknown = sorted(set(nsd_tolerance) - set(names) - {"default"})
        if unknown:
            raise ValueError(f"NSD tolerance given for unknown class(es) {', '.join(unknown)}; "
                             f"the classes are {', '.join(names)}")
        default = float(nsd_tolerance.get("default", fallback))
        out = {n: float(nsd_tolerance.get(n, default)) for n in names}
    bad = [n for n, t in out.items() if not t > 0 or not np.isfinite(t)]
    if bad:
        raise ValueError(f"NSD tolerance must be a positive number of mm (class {bad[0]}: {out[bad[0]]})")
    return out


def compute_metrics(pred: np.ndarray, ref: np.ndarray, labels: LabelSpec, spacing: Sequence[float],
                    nsd_tolerance: Tolerance = None, ignore: int | None = None) -> dict[str, dict]:
    """Every metric for every class of two integer label maps of the same shape; spacing in array axis order.

    ``labels`` is ``{name: value}`` (a list of values makes a region: their union), or a list of values.
    Returns ``{name: {"dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm", "nsd",
    "nsd_tolerance_mm", "volume_ref_mm3", "volume_pred_mm3", "tp", "fp", "fn", "tn", "empty"}}``;
    see the module docstring for the conventions. Each class's bounding box is found in one pass over each
    map, so the cost is dominated by the size of the structures rather than of the image.

    >>> compute_metrics(pred, ref, {"liver": 1, "tumour": 2}, spacing=(3.0, 0.8, 0.8))  # doctest: +SKIP
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} axes, the arrays have {ref.ndim}")
    classes = normalize_labels(labels)
    if any(v <= 0 or v == ignore for vals in classes.values() for v in vals):
        raise ValueError(f"classes {classes} must hold values > 0 other than the ignore label {ignore}")
    tolerances = resolve_tolerances(nsd_tolerance, list(classes), spacing)
    ignored = None if ignore is None else ref == ignore
    n_scored = ref.size - (0 if ignored is None else int(np.count_nonzero(ignored)))
    top = max((v for vals in classes.values() for v in vals), default=0)
    boxes_p, boxes_r = _boxes(pred, top), _boxes(ref, top)
    out = {}
    for name, values in classes.items():
        box = _union([boxes[v - 1] for boxes in (boxes_p, boxes_r) for v in values])
        if box is None:
            out[name] = empty_class_metrics(n_scored, spacing, tolerances[name])
            continue
        box = _grow(box, ref.shape)
        p, r = np.isin(pred[box], values), np.isin(ref[box], values)
        if ignored is not None:
            p &= ~ignored[box]
            r &= ~ignored[box]
        out[name] = _box_metrics(p, r, n_scored, spacing, tolerances[name])
    return out


def _boxes(arr: np.ndarray, top: int) -> list[tuple[slice, ...] | None]:
    """Bounding box of each value 1..top (None where absent), in one pass."""
    if top <= 0:
        return []
    if not np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int64)
    return ndimage.find_objects(arr, max_label=top)
