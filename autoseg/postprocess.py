"""Post-processing of label maps, tuned on the out-of-fold predictions and applied by ``autoseg predict``.

A network makes local decisions; some errors are only visible globally: a speck of liver in the lung, a
second kidney where there is one, a hole in a filled organ. Three rules fix those, each for the foreground
union (all classes as one mask) or for one class:

- ``largest_component``: keep the largest connected component, the rest becomes background;
- ``remove_small``: components below ``min_mm3`` (or ``min_voxels``) become background; the candidate sizes
  are fractions of the class's typical smallest component in the training labels (fingerprint: 5th
  percentile volume over the components per case);
- ``fill_holes``: background enclosed by one class becomes that class (other classes are left alone, so an
  inner structure is never overwritten by the one around it).

One more rule acts before the label map exists: ``class_weights`` multiplies the (summed) probabilities of its
``classes`` by its ``factors`` before the argmax. A small class that the network finds but is not yet sure of
(probability 0.1-0.4 inside it, the background above it) is lost by a plain argmax; a factor tuned on the
out-of-fold probabilities gives it back where that does not cost another class (tried only for a class under
``WEIGHT_MAX_DICE`` out of fold: a class learned already is left to the argmax). It is the first rule when
present; :class:`autoseg.inference.Predictor` applies it at the argmax, :func:`apply_postprocessing` (label maps
only) passes over it. Not for region models (their regions are thresholds at 0.5, not an argmax).

For a region dataset (:mod:`autoseg.schema.labels`) the classes scored and tuned are the regions: a rule's
``classes`` are a region's values (its mask is their union; what a rule removes becomes background), the
groups tried are each region's own (no foreground-union group: the largest region is that union), and the
guard is per region. Components use full connectivity (26 in 3D, 8 in 2D), as the fingerprint counts them.
Rules are data,
kept in ``selection.json``, and run in order::

    [{"rule": "class_weights", "classes": [2], "factors": [4.0]},
     {"rule": "largest_component", "classes": [1, 2]}, {"rule": "remove_small", "classes": [2], "min_mm3": 40.0},
     {"rule": "fill_holes", "classes": [1]}]

>>> seg = apply_postprocessing(seg, rules, spacing=(3.0, 0.8, 0.8))   # doctest: +SKIP

**Tuning** (:func:`tune_postprocessing`) is greedy on the out-of-fold label maps: the rules are tried one
group at a time (the alternatives of a group are the candidate sizes), and a candidate is kept only if
the mean foreground Dice improves *and no class's mean Dice gets worse*: a rule that trades one class for
another is refused, however good the trade looks on average. Class weights are tuned the same way, first, on
the probabilities (:func:`tune_class_weights`), one class at a time over the factors ``WEIGHT_FACTORS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from autoseg.errors import UserError
from autoseg.schema.labels import ClassKey, key_values

RULES = ("class_weights", "largest_component", "remove_small", "fill_holes")
WEIGHT_FACTORS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # class_weights candidates: a factor 8 lets p 0.12 beat p 0.88
# class_weights are tried only for a class whose out-of-fold Dice is below this: a rescue for a class the plain argmax
# mostly loses, not a fine-tuning of one already learned, which a handful of out-of-fold cases overfits (mr-2ch's
# enhancing class at 0.87: a factor 3 raised it to 0.93 out of fold and lowered it from 0.915 to 0.892 on the test cases)
WEIGHT_MAX_DICE = 0.5
SIZE_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)  # of a class's typical smallest component: remove_small candidates
MIN_GAIN = 1e-9  # mean Dice must rise by more than float noise

Rule = dict
Counts = dict[ClassKey, tuple[int, int, int]]  # class (a value, or a region's values) -> (tp, fp, fn) of one case


# --- rules ---------------------------------------------------------------------------------------------


def parse_rules(rules: object, where: str = "post-processing rules") -> list[Rule]:
    """Check rules read from JSON (``"class": c`` is accepted for ``"classes": [c]``); an error names ``where``."""
    if not isinstance(rules, list):
        raise UserError(f"{where}: post-processing must be a list of rules, not {type(rules).__name__}")
    out = []
    for i, r in enumerate(rules):
        bad = f"{where}: rule {i} ({r!r})"
        if not isinstance(r, dict) or r.get("rule") not in RULES:
            raise UserError(f"{bad}: expected {{\"rule\": one of {', '.join(RULES)}, \"classes\": [...]}}")
        r = dict(r)
        if "class" in r:
            r["classes"] = [r.pop("class")]
        classes = r.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, int) and c > 0 for c in classes):
            raise UserError(f"{bad}: 'classes' must be a non-empty list of foreground label values")
        if r["rule"] == "fill_holes" and len(classes) != 1:
            raise UserError(f"{bad}: fill_holes takes one class (the label the holes get)")
        if r["rule"] == "remove_small" and not any(isinstance(r.get(k), (int, float)) for k in ("min_mm3", "min_voxels")):
            raise UserError(f"{bad}: remove_small needs 'min_mm3' or 'min_voxels'")
        if r["rule"] == "class_weights":
            factors = r.get("factors")
            if not isinstance(factors, list) or len(factors) != len(classes) or not all(
                    isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in factors):
                raise UserError(f"{bad}: class_weights needs 'factors', one positive number per class")
            if i != 0:
                raise UserError(f"{bad}: class_weights acts on the probabilities, before the other rules: put it first")
        out.append(r)
    return out


def split_weights(rules: Sequence[Rule]) -> tuple[dict[int, float], list[Rule]]:
    """(class -> probability factor from a ``class_weights`` rule, the label-map rules)."""
    weights: dict[int, float] = {}
    rest = []
    for r in rules:
        if r["rule"] == "class_weights":
            weights.update({int(c): float(f) for c, f in zip(r["classes"], r["factors"])})
        else:
            rest.append(r)
    return weights, rest


def weighted_argmax(total: np.ndarray, weights: Mapping[int, float]) -> np.ndarray:
    """The label map of probabilities ``(K, *spatial)`` with class ``c``'s multiplied by ``weights[c]`` (ties to
    the lower class, as :func:`numpy.argmax`)."""
    if weights:
        factors = np.ones(total.shape[0], np.float32)
        for c, f in weights.items():
            factors[c] = f
        total = total * factors.reshape(-1, *([1] * (total.ndim - 1)))
    return total.argmax(0).astype(np.uint8 if total.shape[0] <= 256 else np.uint16)


def connectivity(ndim: int) -> int:
    return 26 if ndim == 3 else 8


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The mask's bounding box grown by one voxel (so hole filling sees the outside), or None when empty."""
    box = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, mask.shape[ax])))
    return tuple(box)


def min_voxels(rule: Rule, spacing: Sequence[float]) -> int:
    """A remove_small rule's size in voxels at this spacing: components with fewer voxels are removed."""
    if "min_voxels" in rule:
        return int(math.ceil(rule["min_voxels"]))
    return int(math.ceil(round(rule["min_mm3"] / float(np.prod(spacing)), 6)))


def apply_rule(seg: np.ndarray, rule: Rule, spacing: Sequence[float]) -> np.ndarray:
    """Apply one rule to ``seg`` in place (work is done inside the classes' bounding box) and return it."""
    classes = rule["classes"]
    mask = np.isin(seg, classes) if len(classes) > 1 else seg == classes[0]
    box = _box(mask)
    if box is None:
        return seg
    m, view = np.ascontiguousarray(mask[box]), seg[box]
    conn = connectivity(seg.ndim)
    if rule["rule"] == "largest_component":
        view[m & ~cc3d.largest_k(m, k=1, connectivity=conn, binary_image=True).astype(bool)] = 0
    elif rule["rule"] == "remove_small":
        view[m & ~cc3d.dust(m, threshold=min_voxels(rule, spacing), connectivity=conn, in_place=False)] = 0
    elif rule["rule"] == "fill_holes":
        view[ndimage.binary_fill_holes(m) & (view == 0)] = classes[0]
    else:
        raise ValueError(f"unknown post-processing rule {rule['rule']!r}")
    return seg


def apply_postprocessing(seg: np.ndarray, rules: Sequence[Rule], spacing: Sequence[float]) -> np.ndarray:
    """Apply ``rules`` (checked by :func:`parse_rules`) in order to a label map; ``spacing`` follows the
    array's axes. Returns a new array."""
    seg = np.array(seg, copy=True)
    for rule in split_weights(parse_rules(list(rules)))[1]:  # class weights act on probabilities, not here
        apply_rule(seg, rule, spacing)
    return seg


def describe(rule: Rule, names: Mapping[ClassKey, str]) -> str:
    """One readable line: ``remove_small tumour < 12.5 mm3`` (a region's rule by the region's name)."""
    cs = rule["classes"]
    if rule["rule"] == "class_weights":
        return "class_weights " + ", ".join(f"{names.get(c, str(c))} x{f:g}" for c, f in zip(cs, rule["factors"]))
    who = names.get(tuple(cs)) or ("foreground" if len(cs) > 1 else names.get(cs[0], str(cs[0])))
    size = ""
    if rule["rule"] == "remove_small":
        size = f" < {rule['min_mm3']:.4g} mm3" if "min_mm3" in rule else f" < {rule['min_voxels']} voxels"
    return f"{rule['rule']} {who}{size}"


# --- scores from counts ----------------------------------------------------------------------------------


def case_counts(pred: np.ndarray, ref: np.ndarray, classes: Sequence[ClassKey], ignore: int | None = None) -> Counts:
    """(tp, fp, fn) per class (a region: the union of its values) from one confusion matrix; voxels labelled
    ``ignore`` in ``ref`` are left out."""
    if ignore is not None:
        keep = ref != ignore
        pred, ref = pred[keep], ref[keep]
    top = max((v for c in classes for v in key_values(c)), default=0)
    n = int(max(pred.max(initial=0), ref.max(initial=0), top)) + 1
    conf = np.bincount(ref.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n)
    out = {}
    for c in classes:
        v = list(key_values(c))
        tp = int(conf[np.ix_(v, v)].sum())
        out[c] = (tp, int(conf[:, v].sum()) - tp, int(conf[v].sum()) - tp)
    return out


def mean_dice(counts: Sequence[Counts], classes: Sequence[ClassKey]) -> tuple[dict, float | None]:
    """Mean Dice per class over cases (a class empty in both prediction and reference is left out, as in
    :mod:`autoseg.metrics`; None when it is empty everywhere), and their mean over the classes."""
    per_class: dict[ClassKey, float | None] = {}
    for c in classes:
        d = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in (k[c] for k in counts) if tp + fp + fn]
        per_class[c] = float(np.mean(d)) if d else None
    present = [v for v in per_class.values() if v is not None]
    return per_class, (float(np.mean(present)) if present else None)


def _worse(new: float | None, old: float | None) -> bool:
    """A class is worse when its mean drops, or when it appears (as a false positive) where it was absent."""
    if new is None:
        return False
    return old is None or new < old


def acceptable(new: tuple[dict, float | None], old: tuple[dict, float | None]) -> bool:
    """The tuning criterion: the mean improves and no class gets worse."""
    if new[1] is None or (old[1] is not None and new[1] <= old[1] + MIN_GAIN):
        return False
    return not any(_worse(new[0][c], old[0][c]) for c in old[0])


# --- tuning ----------------------------------------------------------------------------------------------


@dataclass
class CaseLabels:
    """One case's out-of-fold label map and reference, cropped to where either has a label (plus a voxel),
    which gives the same Dice and the same rule results as the full arrays for a fraction of the memory."""

    id: str
    pred: np.ndarray
    ref: np.ndarray
    spacing: tuple[float, ...]

    @classmethod
    def cropped(cls, id: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> CaseLabels:
        box = _box((pred != 0) | (ref != 0))
        if box is None:
            box = tuple(slice(0, 1) for _ in pred.shape)
        return cls(id, pred[box].copy(), ref[box].copy(), tuple(float(s) for s in spacing))


def size_bases(fingerprint: object | None, classes: Sequence[ClassKey]) -> dict[ClassKey, float]:
    """Typical smallest component per class in mm3: the 5th-percentile class volume over the median number of
    components per case, from the fingerprint's class statistics (classes it lacks get none; it has label
    values, so a region of several values gets none)."""
    if fingerprint is None:
        return {}
    by_value = {key_values(c)[0]: c for c in classes if len(key_values(c)) == 1}
    out = {}
    for s in getattr(fingerprint, "classes", []):
        if s.value in by_value and s.cases_present and s.volume_mm3.get("p5", 0) > 0:
            out[by_value[s.value]] = float(s.volume_mm3["p5"]) / max(1.0, float(s.components_per_case.get("median", 1.0)))
    return out


def size_bases_from_references(cases: Sequence[CaseLabels], classes: Sequence[ClassKey]) -> dict[ClassKey, float]:
    """:func:`size_bases` measured on the references at hand (a workdir without a fingerprint, or a region)."""
    volumes: dict[ClassKey, list[float]] = {c: [] for c in classes}
    components: dict[ClassKey, list[int]] = {c: [] for c in classes}
    for case in cases:
        for c in classes:
            mask = np.isin(case.ref, key_values(c))
            if mask.any():
                volumes[c].append(int(mask.sum()) * float(np.prod(case.spacing)))
                components[c].append(int(cc3d.connected_components(mask, connectivity=connectivity(mask.ndim),
                                                                   return_N=True)[1]))
    return {c: float(np.percentile(volumes[c], 5)) / max(1.0, float(np.median(components[c])))
            for c in classes if volumes[c]}


def _sizes(classes: list[int], base: float | None) -> list[Rule]:
    """``remove_small`` alternatives: fractions of the typical smallest component (none without one)."""
    if not base:
        return []
    return [{"rule": "remove_small", "classes": classes, "min_mm3": round(base * f, 6)} for f in SIZE_FRACTIONS]


def candidate_groups(classes: Sequence[ClassKey], bases: Mapping[ClassKey, float]) -> list[list[Rule]]:
    """The rules to try, in order; each group's alternatives compete and at most one of them is kept.
    Label values: the foreground union first, then each class; regions: each region's own, in order (a hole
    is filled only in a one-value region, whose value it gets)."""
    groups: list[list[Rule]] = []
    if any(isinstance(c, tuple) for c in classes):
        for r in classes:
            values = list(key_values(r))
            groups += [[{"rule": "largest_component", "classes": values}], _sizes(values, bases.get(r)),
                       [{"rule": "fill_holes", "classes": values}] if len(values) == 1 else []]
        return [g for g in groups if g]
    classes = sorted(classes)
    if len(classes) > 1:
        groups.append([{"rule": "largest_component", "classes": classes}])
        groups.append(_sizes(classes, min((bases[c] for c in classes if c in bases), default=None)))
    for c in classes:
        groups += [[{"rule": "largest_component", "classes": [c]}], _sizes([c], bases.get(c)),
                   [{"rule": "fill_holes", "classes": [c]}]]
    return [g for g in groups if g]


def tune_postprocessing(cases: Sequence[CaseLabels], classes: Sequence[ClassKey], ignore: int | None = None,
                        bases: Mapping[ClassKey, float] | None = None,
                        groups: Sequence[Sequence[Rule]] | None = None) -> tuple[list[Rule], list[dict]]:
    """Choose rules greedily on out-of-fold label maps; returns (kept rules, one log entry per candidate).

    Each candidate is applied on top of the rules kept so far; the best acceptable alternative of a group
    (see :func:`acceptable`) is kept, so the final rules never lower any class's cross-validated Dice.
    """
    groups = candidate_groups(classes, bases or {}) if groups is None else groups
    preds = [c.pred.copy() for c in cases]
    score = mean_dice([case_counts(p, c.ref, classes, ignore) for p, c in zip(preds, cases)], classes)
    kept: list[Rule] = []
    log: list[dict] = []
    for group in groups:
        best = None
        for rule in group:
            trial = [apply_rule(p.copy(), rule, c.spacing) for p, c in zip(preds, cases)]
            counts = [case_counts(p, c.ref, classes, ignore) for p, c in zip(trial, cases)]
            new = mean_dice(counts, classes)
            ok = acceptable(new, score)
            log.append({"rule": rule, "before": score[1], "after": new[1], "class_after": new[0],
                        "acceptable": ok, "kept": False})
            if ok and (best is None or new[1] > best[1][1]):
                best = (log[-1], new, trial)
        if best is not None:
            entry, score, preds = best
            entry["kept"] = True
            kept.append(entry["rule"])
    return kept, log


def tune_class_weights(totals: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], classes: Sequence[int],
                       ignore: int | None = None, factors: Sequence[float] = WEIGHT_FACTORS
                       ) -> tuple[list[Rule], list[dict]]:
    """A ``class_weights`` rule chosen greedily on out-of-fold probabilities, one class at a time (in value
    order; only classes whose out-of-fold mean Dice is below ``WEIGHT_MAX_DICE``), each factor applied on top of
    those kept; a factor is kept under :func:`acceptable` (the mean rises, no class falls). ``totals()`` yields
    each case's (summed probabilities ``(K, *spatial)``, reference) anew, so the cases need not all be held in
    memory. Returns ([] or [the rule], one log entry per factor tried)."""
    kept: dict[int, float] = {}
    log: list[dict] = []
    score = mean_dice([case_counts(weighted_argmax(total, kept), ref, classes, ignore) for total, ref in totals()],
                      classes)
    for c in classes:
        if score[0][c] is None or score[0][c] >= WEIGHT_MAX_DICE:
            continue  # absent, or learned already: left to the argmax
        trial_weights = [{**kept, c: f} for f in factors]
        tried: list[list[Counts]] = [[] for _ in factors]
        for total, ref in totals():
            for k, w in enumerate(trial_weights):
                tried[k].append(case_counts(weighted_argmax(total, w), ref, classes, ignore))
        best = None
        for w, counts in zip(trial_weights, tried):
            new = mean_dice(counts, classes)
            ok = acceptable(new, score)
            log.append({"rule": _weights_rule(w), "before": score[1], "after": new[1], "class_after": new[0],
                        "acceptable": ok, "kept": False})
            if ok and (best is None or new[1] > best[1][1]):
                best = (log[-1], new, w)
        if best is not None:
            best[0]["kept"] = True
            kept, score = best[2], best[1]
    return ([_weights_rule(kept)] if kept else []), log


def _weights_rule(weights: Mapping[int, float]) -> Rule:
    cs = sorted(weights)
    return {"rule": "class_weights", "classes": cs, "factors": [float(weights[c]) for c in cs]}
