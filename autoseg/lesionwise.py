"""Lesion-wise (instance) metrics: how many objects were found, how many invented, and how well each is drawn.

Voxel Dice hides what a clinician counting metastases or a biologist counting nuclei asks: a large lesion
segmented well and three small ones missed still scores a high Dice. Here every object counts once.

Instances of a class are given as an instance map (0 none, 1..N one object each; ids need not be
consecutive) or, for a semantic map, as its connected components (:func:`components`, full connectivity).
Two matchings:

- ``"iou"``: a reference and a predicted instance match when their IoU exceeds 0.5. Above 0.5 a match is
  necessarily one-to-one (two objects cannot both cover more than half of a third), so no assignment
  problem is solved. This is the matching of panoptic quality (Kirillov et al. 2019) and of MONAI's
  ``compute_panoptic_quality``.
- ``"brats"``: the BraTS 2023 lesion-wise rule. Reference components closer than the dilation are first
  merged into one lesion (:func:`brats_reference`, only for references given as components); each reference
  lesion, dilated by ``dilation`` steps of the 18-neighbour (3D; 8-neighbour in 2D) structure, matches
  every predicted component it touches, and its Dice is taken against their union. A predicted component
  that touches no dilated reference lesion is a false positive. Matches may be many-to-one either way.

Counts and scores per class and case (:class:`LesionCounts`): ``n_ref``, ``n_pred``; ``tp`` reference lesions
found, ``fn`` reference lesions missed, ``tp_pred`` predicted lesions matched, ``fp`` predicted lesions
matched to nothing; ``precision = tp_pred / n_pred``, ``recall = tp / n_ref``, ``f1 = (tp + tp_pred) / (n_ref +
n_pred)`` (the F1 for one-to-one matching); ``lesion_dice`` = sum of the reference lesions' Dice (0 when missed)
over ``n_ref + fp`` (BraTS: missed and false lesions count as zero); panoptic quality ``sq`` = mean IoU of the
matches, ``rq = tp / (tp + fp/2 + fn/2)``, ``pq = sq * rq`` (``"iou"`` matching only). As in
:mod:`autoseg.metrics`, a ratio whose denominator is zero is NaN (no lesion in either map: every score NaN).
Over cases, counts are pooled (summed, then the ratios taken: each lesion weighs the same) and per-case
scores are averaged with NaN left out.

All of it is bincount arithmetic on the foreground voxels and per-lesion bounding boxes: no Python loop
over voxels, so 3D volumes with hundreds of lesions score in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import cc3d
import numpy as np
from scipy import ndimage

MODES = ("iou", "brats")
IOU_THRESHOLD = 0.5
BRATS_DILATION = 1  # BraTS-MET 2023; the glioma tasks use 3
SCORES = ("precision", "recall", "f1", "lesion_dice", "sq", "rq", "pq")
COUNT_FIELDS = ("n_ref", "n_pred", "tp", "tp_pred", "fp", "fn")
NAN = float("nan")


def components(mask: np.ndarray) -> np.ndarray:
    """Connected components of a boolean mask (full connectivity: 8 in 2D, 26 in 3D) as ids 1..N."""
    connectivity = 8 if mask.ndim == 2 else 26
    return cc3d.connected_components(np.ascontiguousarray(mask, dtype=bool), connectivity=connectivity).astype(np.int32)


def class_instances(label: np.ndarray, value: int, instances: np.ndarray | None = None) -> np.ndarray:
    """The instances of class ``value``: the instance map's ids on the class's voxels, else its components."""
    mask = label == value
    if instances is None:
        return components(mask)
    return np.where(mask, instances, 0)


def _structure(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, 2)


def brats_reference(mask: np.ndarray, dilation: int = BRATS_DILATION) -> np.ndarray:
    """BraTS 2023's reference lesions: components of the mask, those that the dilation joins merged into one."""
    if dilation <= 0 or not mask.any():
        return components(mask)
    grown = ndimage.binary_dilation(mask, _structure(mask.ndim), iterations=dilation)
    return np.where(mask, components(grown), 0).astype(np.int32)


# --- one class of one case -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """One reference lesion and the predicted lesions it matched (none: missed)."""

    ref: int
    preds: tuple[int, ...]
    iou: float
    dice: float


@dataclass(frozen=True)
class Matching:
    """How one class's reference and predicted instances pair up in one case (ids as in the given maps)."""

    mode: str
    matches: tuple[Match, ...]  # one per reference lesion, missed ones with no preds
    false_positives: tuple[int, ...]  # predicted ids matched to nothing
    n_pred: int

    @property
    def missed(self) -> tuple[int, ...]:
        return tuple(m.ref for m in self.matches if not m.preds)

    def counts(self) -> LesionCounts:
        found = [m for m in self.matches if m.preds]
        matched_preds = {p for m in found for p in m.preds}
        return LesionCounts(n_ref=len(self.matches), n_pred=self.n_pred, tp=len(found), tp_pred=len(matched_preds),
                            fp=len(self.false_positives), fn=len(self.matches) - len(found),
                            sum_dice=float(sum(m.dice for m in found)), sum_iou=float(sum(m.iou for m in found)),
                            panoptic=self.mode == "iou")


def _ratio(num: float, den: float) -> float:
    return num / den if den else NAN


@dataclass(frozen=True)
class LesionCounts:
    """What one class contributes in one case (or, summed, over cases); the scores follow from it."""

    n_ref: int = 0
    n_pred: int = 0
    tp: int = 0
    tp_pred: int = 0
    fp: int = 0
    fn: int = 0
    sum_dice: float = 0.0
    sum_iou: float = 0.0
    panoptic: bool = field(default=True)  # PQ is defined for the one-to-one IoU matching only

    def __add__(self, other: LesionCounts) -> LesionCounts:
        sums = {k: getattr(self, k) + getattr(other, k) for k in (*COUNT_FIELDS, "sum_dice", "sum_iou")}
        return LesionCounts(**sums, panoptic=self.panoptic and other.panoptic)

    def scores(self) -> dict[str, float]:
        rq = _ratio(self.tp, self.tp + 0.5 * (self.fp + self.fn))
        sq = _ratio(self.sum_iou, self.tp) if self.tp else (0.0 if self.n_ref + self.n_pred else NAN)
        return {
            "precision": _ratio(self.tp_pred, self.n_pred),
            "recall": _ratio(self.tp, self.n_ref),
            "f1": _ratio(self.tp + self.tp_pred, self.n_ref + self.n_pred),
            "lesion_dice": _ratio(self.sum_dice, self.n_ref + self.fp),
            "sq": sq if self.panoptic else NAN,
            "rq": rq if self.panoptic else NAN,
            "pq": _ratio(self.sum_iou, self.tp + 0.5 * (self.fp + self.fn)) if self.panoptic else NAN,
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("panoptic")
        return {**d, **self.scores()}


@dataclass(frozen=True)
class _Table:
    """The overlap of two instance maps on their foreground: ids, voxel counts and the contingency table."""

    ref_ids: np.ndarray  # [0, id1, id2, ...]
    pred_ids: np.ndarray
    table: np.ndarray  # (len(ref_ids), len(pred_ids)) voxel counts; row/column 0: no instance

    @property
    def ref_voxels(self) -> np.ndarray:
        return self.table.sum(axis=1)

    @property
    def pred_voxels(self) -> np.ndarray:
        return self.table.sum(axis=0)


def _consecutive(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids with 0 first, index of each value in them)."""
    ids = np.unique(np.concatenate([np.zeros(1, values.dtype), values]))
    return ids, np.searchsorted(ids, values)


def _overlap(ref: np.ndarray, pred: np.ndarray) -> tuple[_Table, np.ndarray, np.ndarray]:
    """The overlap table, and both maps relabelled to consecutive ids (indices into the table)."""
    if ref.shape != pred.shape:
        raise ValueError(f"instance maps differ in shape: {ref.shape} vs {pred.shape}")
    fg = (ref > 0) | (pred > 0)
    r_ids, r_idx = _consecutive(ref[fg])
    p_ids, p_idx = _consecutive(pred[fg])
    n_p = len(p_ids)
    table = np.bincount(r_idx * n_p + p_idx, minlength=len(r_ids) * n_p).reshape(len(r_ids), n_p)
    ref_c = np.zeros(ref.shape, np.int32)
    pred_c = np.zeros(pred.shape, np.int32)
    ref_c[fg], pred_c[fg] = r_idx, p_idx
    return _Table(r_ids, p_ids, table), ref_c, pred_c


def match_instances(ref: np.ndarray, pred: np.ndarray, mode: str = "iou", dilation: int = BRATS_DILATION) -> Matching:
    """Match the instances of one class (two instance maps of the same shape) by ``mode`` (see the module)."""
    if mode not in MODES:
        raise ValueError(f"unknown matching '{mode}'; choose one of {', '.join(MODES)}")
    t, ref_c, pred_c = _overlap(ref, pred)
    area_r, area_p = t.ref_voxels, t.pred_voxels
    inter = t.table[1:, 1:].astype(np.float64)
    union = area_r[1:, None] + area_p[None, 1:] - inter
    n_ref, n_pred = len(t.ref_ids) - 1, len(t.pred_ids) - 1
    matches: list[Match] = []
    if mode == "iou":
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        hit = iou > IOU_THRESHOLD  # at most one per row and column
        for i in range(n_ref):
            j = np.flatnonzero(hit[i])
            if j.size:
                k = int(j[0])
                d = 2 * inter[i, k] / (area_r[i + 1] + area_p[k + 1])
                matches.append(Match(int(t.ref_ids[i + 1]), (int(t.pred_ids[k + 1]),), float(iou[i, k]), float(d)))
            else:
                matches.append(Match(int(t.ref_ids[i + 1]), (), 0.0, 0.0))
        used = hit.any(axis=0)
    else:
        used = np.zeros(n_pred, bool)
        structure = _structure(ref.ndim)
        boxes = ndimage.find_objects(ref_c)
        for i, box in enumerate(boxes):
            grown = tuple(slice(max(s.start - dilation, 0), min(s.stop + dilation, n)) for s, n in zip(box, ref.shape))
            lesion = ref_c[grown] == i + 1
            reach = ndimage.binary_dilation(lesion, structure, iterations=dilation) if dilation > 0 else lesion
            hits = np.unique(pred_c[grown][reach])
            hits = hits[hits > 0] - 1  # indices into the columns of ``inter``
            used[hits] = True
            if hits.size:
                shared = float(inter[i, hits].sum())
                pred_area = float(area_p[hits + 1].sum())
                d = 2 * shared / (area_r[i + 1] + pred_area)
                u = area_r[i + 1] + pred_area - shared
                preds = tuple(int(x) for x in t.pred_ids[hits + 1])
                matches.append(Match(int(t.ref_ids[i + 1]), preds, shared / u, d))
            else:
                matches.append(Match(int(t.ref_ids[i + 1]), (), 0.0, 0.0))
    false = tuple(int(x) for x in t.pred_ids[1:][~used])
    return Matching(mode, tuple(matches), false, n_pred)


# --- a case, and over cases --------------------------------------------------------------------------------


def case_lesionwise(ref_label: np.ndarray, pred_label: np.ndarray, classes: Mapping[str, int],
                    ref_instances: np.ndarray | None = None, pred_instances: np.ndarray | None = None,
                    modes: Sequence[str] = MODES, dilation: int = BRATS_DILATION
                    ) -> dict[str, dict[str, Matching]]:
    """Class name -> matching mode -> :class:`Matching` for one case.

    Instance maps are optional on either side (components of each class otherwise); in ``"brats"`` mode a
    reference given as components gets BraTS's merge of lesions the dilation joins.
    """
    out: dict[str, dict[str, Matching]] = {}
    for name, value in classes.items():
        pred = class_instances(pred_label, value, pred_instances)
        ref = class_instances(ref_label, value, ref_instances)
        out[name] = {}
        for mode in modes:
            r = brats_reference(ref_label == value, dilation) if mode == "brats" and ref_instances is None else ref
            out[name][mode] = match_instances(r, pred, mode, dilation)
    return out


def pooled(counts: Iterable[LesionCounts]) -> LesionCounts:
    total = LesionCounts()
    for c in counts:
        total = total + c
    return total


def summarize(per_case: Sequence[Mapping[str, float | int]], mode: str = "iou") -> dict:
    """Over cases of one class and mode: the pooled counts and scores, and the case means of the scores."""
    keys = (*COUNT_FIELDS, "sum_dice", "sum_iou")
    total = pooled(LesionCounts(**{k: c[k] for k in keys}, panoptic=mode == "iou") for c in per_case)
    means = {}
    for s in SCORES:
        values = [float(c[s]) for c in per_case if c[s] is not None and not math.isnan(float(c[s]))]
        means[s] = float(np.mean(values)) if values else None
    pooled_scores = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in total.as_dict().items()}
    return {"pooled": pooled_scores, "case_mean": means, "cases": len(per_case)}
