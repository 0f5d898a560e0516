"""A per-case quality flag: is this prediction likely below the Dice the user asked for?

A model that segments an image unlike anything it was trained on fails silently. Every case
``autoseg predict`` segments gets three kinds of evidence, and one verdict:

(a) **input checks** against what training saw (:class:`Envelope`, built from the training images when the
    model is selected): spacing and size per axis, orientation (which physical axis each array axis runs
    along, and its sign), channel count, and per channel the image's 1st, 50th and 99th intensity percentiles;
    a value outside the training range (widened by a tolerance) fails its check. The fingerprint's class
    statistics give **output checks**: a structure predicted far larger or smaller than any training case
    had, or missing where training nearly always had it; a structure whose centroid (per array axis, as a
    share of the image's extent) lies where no training case had it, as in an array flipped with its
    header kept.
(b) **model disagreement**: the mean pairwise Dice of the folds' label maps (each member's, in its
    preprocessed space) and of the ensemble's configurations (restored to the image), and the mean normalised
    entropy of the probabilities inside the predicted structures.
(c) **one score per case**, the model's own estimate of its Dice: per foreground class, the soft Dice between
    the (fold- and member-averaged) probabilities and the label map they give, ``2 Σ p·[seg=c] / (Σ p + |seg=c|)``,
    averaged over the classes. Folds that disagree lower it (their mean is less sure), so does a flat or
    noisy probability map. It is computed the same way on the out-of-fold probabilities when the model is
    selected (:func:`calibrate`, from :mod:`autoseg.select`), where the real Dice is known: the threshold is the
    score that best separates the out-of-fold cases below ``min_dice`` from the others (Youden's J), so that
    *flagged* means "likely below min_dice". ``min_dice`` defaults to the out-of-fold median Dice minus
    :data:`DEFAULT_MARGIN` (``--min-dice`` on ``autoseg train`` / ``select``); how well the score ranks the
    real Dice there (Spearman) and how many of the worst cases it flags is kept with the calibration.

A case is flagged when its score is under the threshold, when an input or output check fails, or when its
folds agree with each other less than ``min_dice`` (they cannot all be right). The calibration lives in
``selection.json`` (``quality``) and in a bundle's manifest; ``autoseg predict`` writes one ``quality.json``
per run in the output folder, an entry per case (:data:`QUALITY_FILE`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.artifacts import header, json_safe, write_json
from autoseg.io import Geometry

QUALITY_FILE = "quality.json"
DEFAULT_MARGIN = 0.05  # default min_dice: the out-of-fold median Dice minus this
PERCENTILES = (1.0, 50.0, 99.0)  # per channel, of the whole image
SAMPLE_VOXELS = 262_144  # intensity percentiles from at most this many voxels (a regular subsample)
SPACING_TOLERANCE = 1.5  # a spacing this many times beyond the training range fails
SHAPE_TOLERANCE = 2.0  # a size this many times beyond the training range fails
INTENSITY_TOLERANCE = 0.25  # a percentile beyond the training range by this share of the typical p1-p99 span fails
VOLUME_TOLERANCE = 3.0  # a structure this many times beyond the training 5th-95th percentile volume fails
# A structure whose centroid lies this share of the image's extent beyond where any training case had it (per
# axis) fails. Wide enough for what a small training set under-samples (patient position, field-of-view cropping
# move a structure by a tenth of the extent or so); narrow enough that an array flipped along an axis with its
# header kept (a centroid at x moves to 1 - x) is caught for a structure whose training range lies off the
# middle of that axis by more than half of this: a liver trained at 0.21-0.38 lands at 0.62-0.79, beyond 0.53.
POSITION_TOLERANCE = 0.15
USUALLY_PRESENT = 0.9  # a class in at least this share of training cases is expected in every case
MAX_FALSE_FLAGS = 0.2  # the calibrated threshold flags at most this share of the out-of-fold cases above min_dice
MIN_MASS = 1.0  # a class whose probabilities sum to less (and that is not predicted) has no estimate


# --- (a) the input against what training saw ---------------------------------------------------------------


@dataclass
class InputFeatures:
    """What the input checks compare: spacing and shape (array axes), orientation, channels, percentiles."""

    spacing: list[float]
    shape: list[int]
    orientation: str
    channels: int
    percentiles: list[list[float]]  # per channel, the values at :data:`PERCENTILES`


def orientation_code(direction: Sequence[float], ndim: int) -> str:
    """Which physical axis each image axis runs along, with its sign: ``+x+y+z`` for the identity, ``-x+y+z``
    for a left-right flip in the header (SimpleITK's direction: column ``i`` is image axis ``i``)."""
    d = np.asarray(direction, dtype=float).reshape(ndim, ndim)
    code = ""
    for i in range(ndim):
        col = d[:, i]
        j = int(np.argmax(np.abs(col)))
        code += ("+" if col[j] >= 0 else "-") + "xyzw"[j]
    return code


def input_features(images: np.ndarray, geometry: Geometry) -> InputFeatures:
    """The features of one image ``(C, *spatial)`` with its geometry."""
    spatial = images.shape[1:]
    step = max(1, int(round((math.prod(spatial) / SAMPLE_VOXELS) ** (1 / len(spatial)))))
    sample = images[(slice(None), *(slice(None, None, step),) * len(spatial))]
    percentiles = []
    for c in range(images.shape[0]):
        values = sample[c].astype(np.float32, copy=False)
        values = values[np.isfinite(values)]
        percentiles.append([float(v) for v in np.percentile(values, PERCENTILES)] if values.size else
                           [math.nan] * len(PERCENTILES))
    return InputFeatures([float(s) for s in geometry.spacing], [int(s) for s in spatial],
                         orientation_code(geometry.direction, geometry.ndim), int(images.shape[0]), percentiles)


@dataclass
class Envelope:
    """The range of each input feature over the training cases."""

    spacing_min: list[float]
    spacing_max: list[float]
    shape_min: list[int]
    shape_max: list[int]
    orientations: list[str]
    channels: int
    percentile_min: list[list[float]]
    percentile_max: list[list[float]]
    intensity_span: list[float]  # per channel, the median over cases of p99 - p1

    @classmethod
    def of(cls, cases: Sequence[InputFeatures]) -> Envelope:
        if not cases:
            raise ValueError("an envelope needs at least one training case")
        spacing = np.array([c.spacing for c in cases])
        shape = np.array([c.shape for c in cases])
        pct = np.array([c.percentiles for c in cases])  # (cases, channels, percentiles)
        return cls(spacing.min(0).tolist(), spacing.max(0).tolist(), shape.min(0).tolist(), shape.max(0).tolist(),
                   sorted({c.orientation for c in cases}), cases[0].channels, np.nanmin(pct, 0).tolist(),
                   np.nanmax(pct, 0).tolist(), np.nanmedian(pct[:, :, -1] - pct[:, :, 0], 0).tolist())


@dataclass
class Check:
    """One check of one case: its name, whether it passed, and a line saying what was seen."""

    name: str
    ok: bool
    detail: str


def _mm(values: Iterable[float]) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def input_checks(f: InputFeatures, env: Envelope) -> list[Check]:
    """Each input feature of a case against the training envelope (tolerances: the module's constants)."""
    checks = [Check("channels", f.channels == env.channels, f"{f.channels} channel(s), training {env.channels}")]
    if len(f.spacing) != len(env.spacing_min):
        return checks + [Check("dimensions", False, f"{len(f.spacing)}D image, training {len(env.spacing_min)}D")]
    out = [a for a, s in enumerate(f.spacing) if not env.spacing_min[a] / SPACING_TOLERANCE <= s
           <= env.spacing_max[a] * SPACING_TOLERANCE]
    checks.append(Check("spacing", not out, f"spacing {_mm(f.spacing)} mm, training {_mm(env.spacing_min)} to "
                        f"{_mm(env.spacing_max)} mm" + (f" (axis {', '.join(map(str, out))} outside)" if out else "")))
    out = [a for a, s in enumerate(f.shape) if not env.shape_min[a] / SHAPE_TOLERANCE <= s
           <= env.shape_max[a] * SHAPE_TOLERANCE]
    checks.append(Check("size", not out, f"size {_mm(f.shape)}, training {_mm(env.shape_min)} to {_mm(env.shape_max)}"))
    checks.append(Check("orientation", f.orientation in env.orientations,
                        f"orientation {f.orientation}, training {', '.join(env.orientations)}"))
    bad = []
    for c, values in enumerate(f.percentiles[:env.channels]):
        margin = INTENSITY_TOLERANCE * env.intensity_span[c]
        for p, v, lo, hi in zip(PERCENTILES, values, env.percentile_min[c], env.percentile_max[c]):
            if not (lo - margin <= v <= hi + margin):  # NaN fails
                bad.append(f"channel {c} p{p:g} {v:.4g} (training {lo:.4g} to {hi:.4g})")
    checks.append(Check("intensity", not bad, "; ".join(bad) if bad else "intensity percentiles within training's"))
    return checks


# --- the output against the fingerprint's classes ----------------------------------------------------------


@dataclass
class ClassRange:
    """A label value's training statistics: in what share of cases it is present, its volume's 5th-95th
    percentile (mm3, over the cases where present) and, per array axis, the range of its centroid as a share
    of the image's extent (:func:`autoseg.fingerprint.class_centroids`; None from a fingerprint written
    before centroids were kept, and in calibrations made before: the position check is then skipped)."""

    name: str
    present_share: float
    volume_p5: float
    volume_p95: float
    position_min: list[float] | None = None
    position_max: list[float] | None = None


def _position_range(key: str, cases: Sequence[Any]) -> tuple[list[float] | None, list[float] | None]:
    """Per axis, the lowest and highest centroid of label value ``key`` over the training cases that hold it;
    (None, None) when any of them has no centroid (an older fingerprint) or none holds it."""
    holding = [c for c in cases if c.class_voxels.get(key, 0) > 0]
    centroids = [getattr(c, "class_centroid", {}).get(key) for c in holding]
    if not centroids or any(x is None for x in centroids):
        return None, None
    at = np.array(centroids, float)
    return at.min(0).tolist(), at.max(0).tolist()


def class_ranges(fingerprint: Any) -> dict[str, ClassRange]:
    """Label value (as str) -> :class:`ClassRange`, from a :class:`~autoseg.schema.fingerprint.Fingerprint`
    (the positions from its cases' centroids)."""
    n = max(1, len(fingerprint.cases))
    return {str(s.value): ClassRange(s.name, s.cases_present / n, float(s.volume_mm3.get("p5", 0.0)),
                                     float(s.volume_mm3.get("p95", math.inf)),
                                     *_position_range(str(s.value), fingerprint.cases))
            for s in fingerprint.classes if s.value != 0}


def output_checks(seg: np.ndarray, spacing: Sequence[float], ranges: Mapping[str, ClassRange]) -> list[Check]:
    """The predicted volume of each label value against its training range, and classes that training nearly
    always had but the prediction lacks; then where each lies (:func:`position_checks`)."""
    voxel = float(np.prod(spacing))
    counts = np.bincount(seg.ravel().astype(np.int64), minlength=1 + max((int(v) for v in ranges), default=0))
    odd = []
    for value, r in ranges.items():
        volume = float(counts[int(value)]) * voxel
        if volume == 0:
            if r.present_share >= USUALLY_PRESENT:
                odd.append(f"{r.name} missing (present in {r.present_share:.0%} of training cases)")
        elif r.present_share > 0 and not r.volume_p5 / VOLUME_TOLERANCE <= volume <= r.volume_p95 * VOLUME_TOLERANCE:
            odd.append(f"{r.name} {volume:.4g} mm3 (training {r.volume_p5:.4g} to {r.volume_p95:.4g})")
    return [Check("structures", not odd, "; ".join(odd) if odd else "structure volumes within training's"),
            *position_checks(seg, ranges)]


def position_checks(seg: np.ndarray, ranges: Mapping[str, ClassRange]) -> list[Check]:
    """Where each predicted structure lies: its centroid per axis against the training range widened by
    :data:`POSITION_TOLERANCE` (an array flipped with its header kept puts it where no training case had it).
    No check when no class has a training range (an older calibration); a structure absent from the
    prediction is left to the volume check."""
    known = {v: r for v, r in ranges.items()
             if r.position_min is not None and r.position_max is not None and len(r.position_min) == seg.ndim}
    if not known:
        return []
    from autoseg.fingerprint import class_centroids

    at = class_centroids(seg)
    odd = []
    for value, r in known.items():
        for axis, (x, lo, hi) in enumerate(zip(at.get(value, ()), r.position_min, r.position_max)):
            if not lo - POSITION_TOLERANCE <= x <= hi + POSITION_TOLERANCE:
                odd.append(f"{r.name} centroid at {x:.2f} of axis {axis}, training {lo:.2f}-{hi:.2f}")
    return [Check("position", not odd, "; ".join(odd) if odd else "structure positions within training's")]


# --- (b) and (c): what the model's probabilities say -------------------------------------------------------


def _labels(p: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Softmax maps -> label map (argmax); sigmoid maps -> one mask per region (above 0.5)."""
    return p > 0.5 if sigmoid else p.argmax(0)


def _masks(labels: torch.Tensor, classes: int, sigmoid: bool) -> Iterable[tuple[int, torch.Tensor]]:
    for c in range(0 if sigmoid else 1, classes):
        yield c, labels[c] if sigmoid else labels == c


def class_confidence(probabilities: np.ndarray | torch.Tensor, sigmoid: bool = False) -> dict[int, float | None]:
    """Per foreground class (every region, for sigmoid maps), the soft Dice between its probability map and
    the mask it gives: the model's own estimate of its Dice (None where the class has neither mass nor mask)."""
    p = torch.as_tensor(probabilities)
    labels = _labels(p, sigmoid)
    out: dict[int, float | None] = {}
    for c, mask in _masks(labels, p.shape[0], sigmoid):
        pc = p[c].float()
        mass, size = float(pc.sum()), int(mask.sum())
        out[c] = None if size == 0 and mass < MIN_MASS else 2 * float(pc[mask].sum()) / (mass + size)
    return out


def foreground_entropy(probabilities: np.ndarray | torch.Tensor, sigmoid: bool = False) -> float | None:
    """Mean entropy (normalised to [0, 1]) of the probabilities inside the predicted structures."""
    p = torch.as_tensor(probabilities)
    labels = _labels(p, sigmoid)
    fg = labels.any(0) if sigmoid else labels > 0
    if not bool(fg.any()):
        return None
    q = p[:, fg].float().clamp_min(1e-6)
    if sigmoid:
        h = -(q * q.log() + (1 - q).clamp_min(1e-6) * (1 - q).clamp_min(1e-6).log()) / math.log(2)
        return float(h.mean())
    return float((-(q * q.log()).sum(0) / math.log(p.shape[0])).mean())


def pairwise_dice(maps: Sequence[torch.Tensor | np.ndarray], classes: int, sigmoid: bool = False) -> float | None:
    """Mean over pairs of maps and over foreground classes present in either of the pair of their Dice: how
    much the folds (or the configurations) of an ensemble agree. None for fewer than two maps."""
    maps = [torch.as_tensor(np.asarray(m)) if isinstance(m, np.ndarray) else m for m in maps]
    scores = []
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            for (_, a), (_, b) in zip(_masks(maps[i], classes, sigmoid), _masks(maps[j], classes, sigmoid)):
                total = int(a.sum()) + int(b.sum())
                if total:
                    scores.append(2 * int((a & b).sum()) / total)
    return float(np.mean(scores)) if scores else None


def score_of(confidence: Mapping[int, float | None], expected: Iterable[int] = ()) -> float:
    """One number per case: the mean of the class estimates; a class training nearly always had (``expected``)
    counts 0 where the prediction has neither mass nor mask; no estimate at all (nothing predicted, nothing
    expected) is 1.0."""
    values = [v if v is not None else 0.0 for c, v in confidence.items() if v is not None or c in set(expected)]
    return float(np.mean(values)) if values else 1.0


@dataclass
class ModelFeatures:
    """Model disagreement and confidence of one case (from each member's fold-mean probabilities)."""

    score: float
    confidence: dict[str, float | None]
    entropy: float | None
    fold_agreement: float | None
    member_agreement: float | None


def model_features(outputs: Sequence[Any], expected: Iterable[int] = ()) -> ModelFeatures:
    """From :class:`~autoseg.ensemble.MemberOutput` s (with their folds' label maps when collected): the
    class estimates and entropy per member, averaged; the folds' and members' agreement."""
    from autoseg.preprocess import restore_to_original

    conf: dict[int, list[float | None]] = {}
    entropies, folds, restored = [], [], []
    for out in outputs:
        p = out.probabilities.float()  # float16 arithmetic is slow on CPUs
        for c, v in class_confidence(p, out.sigmoid).items():
            conf.setdefault(c, []).append(v)
        entropies.append(foreground_entropy(p, out.sigmoid))
        del p
        k = out.probabilities.shape[0]
        folds.append(pairwise_dice(out.fold_labels, k, out.sigmoid))
        if len(outputs) > 1 and not out.sigmoid:
            labels = out.probabilities.argmax(0).to(torch.uint8).numpy()
            restored.append(restore_to_original(labels, out.properties, out.cfg, is_label=True))
    merged = {c: (float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v) else None)
              for c, v in conf.items()}
    k = outputs[0].probabilities.shape[0]
    return ModelFeatures(score_of(merged, expected), {str(c): v for c, v in merged.items()},
                         _mean(entropies), _mean(folds), pairwise_dice(restored, k) if restored else None)


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


# --- the calibration (selection time) and the verdict (prediction time) ------------------------------------


@dataclass
class QualityModel:
    """What prediction needs to flag a case: the training envelope, the classes' ranges, the score's
    threshold and the Dice it stands for, and how well the score ranked the out-of-fold Dice."""

    min_dice: float
    threshold: float
    envelope: Envelope
    classes: dict[str, ClassRange] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    expected: list[int] = field(default_factory=list)  # output channels scored 0 when empty (:func:`score_of`)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QualityModel:
        return cls(float(d["min_dice"]), float(d["threshold"]), Envelope(**d["envelope"]),
                   {k: ClassRange(**v) for k, v in d.get("classes", {}).items()}, dict(d.get("calibration", {})),
                   [int(c) for c in d.get("expected", [])])


@dataclass
class CaseQuality:
    """The verdict on one predicted case, as ``quality.json`` holds it."""

    score: float
    flagged: bool
    reasons: list[str]
    model: ModelFeatures
    checks: list[Check]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def assess(quality: QualityModel, features: InputFeatures, model: ModelFeatures, seg: np.ndarray,
           spacing: Sequence[float]) -> CaseQuality:
    """The verdict: flagged when the score is under the threshold, a check fails, or the folds agree less
    than ``min_dice``."""
    checks = input_checks(features, quality.envelope) + output_checks(seg, spacing, quality.classes)
    reasons = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    if model.score < quality.threshold:
        reasons.insert(0, f"score {model.score:.3f} < {quality.threshold:.3f} (calibrated for Dice "
                          f"{quality.min_dice:.3f})")
    if model.fold_agreement is not None and model.fold_agreement < quality.min_dice:
        reasons.append(f"folds agree at Dice {model.fold_agreement:.3f} < {quality.min_dice:.3f}")
    return CaseQuality(model.score, bool(reasons), reasons, model, checks)


def expected_channels(ranges: Mapping[str, ClassRange], sigmoid: bool) -> list[int]:
    """Output channels a case is expected to hold: the label values training nearly always had (softmax
    channel c is label c; none for region models, whose channels are regions)."""
    return [] if sigmoid else sorted(int(v) for v, r in ranges.items() if r.present_share >= USUALLY_PRESENT)


def calibrate(scores: Sequence[float], dices: Sequence[float], envelope: Envelope,
              classes: Mapping[str, ClassRange] | None = None, min_dice: float | None = None,
              expected: Sequence[int] = (), case_ids: Sequence[str] = ()) -> QualityModel:
    """The threshold on the score for "likely below ``min_dice``", from out-of-fold cases (``scores``: their
    scores, ``dices``: their real mean foreground Dice). ``min_dice`` defaults to the median Dice minus
    :data:`DEFAULT_MARGIN`. The threshold maximises Youden's J (share of the cases below ``min_dice`` flagged
    minus share of the others flagged) among those that flag at most :data:`MAX_FALSE_FLAGS` of the others.
    When that is no gain (J <= 0), when the score does not rank the Dice (Spearman <= 0, or under 3 cases), or
    when no out-of-fold case is below ``min_dice`` (or every one is), it is the lowest out-of-fold score minus
    :data:`DEFAULT_MARGIN`: only a case less sure than any seen is flagged by its score.
    ``case_ids``: the cases' names, to keep each one's score and Dice with the calibration.
    """
    from scipy.stats import spearmanr

    s, d = np.asarray(scores, float), np.asarray(dices, float)
    if min_dice is None:
        min_dice = float(np.median(d)) - DEFAULT_MARGIN if d.size else 0.5
    low = d < min_dice
    rho = float(spearmanr(s, d)[0]) if d.size >= 3 and np.ptp(s) > 0 and np.ptp(d) > 0 else None
    threshold, rule = (float(s.min()) - DEFAULT_MARGIN if s.size else 0.0), "the lowest score minus the margin: "
    if d.size == 0 or low.all() or not low.any():
        rule += "no out-of-fold case on both sides of min_dice"
    elif rho is None or rho <= 0:
        rule += "the score does not rank the out-of-fold Dice"
    else:
        cuts = np.unique(s)
        best = 0.0
        for t in np.concatenate([(cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]]):
            false = float(np.mean(s[~low] < t))
            if false <= MAX_FALSE_FLAGS and float(np.mean(s[low] < t)) - false > best:
                threshold, best = float(t), float(np.mean(s[low] < t)) - false
        rule = "Youden's J on the out-of-fold cases" if best > 0 else rule + "no threshold separates them"
    flagged = s < threshold
    worst = np.argsort(d)[:max(1, int(low.sum()))] if d.size else np.array([], int)
    report = {"cases": int(d.size), "min_dice": float(min_dice), "below_min_dice": int(low.sum()),
              "flagged": int(flagged.sum()), "flagged_below_min_dice": int((flagged & low).sum()),
              "flagged_above_min_dice": int((flagged & ~low).sum()),
              "worst_cases": int(worst.size), "worst_flagged": int(flagged[worst].sum()) if worst.size else 0,
              "spearman_score_dice": rho, "rule": rule,
              "median_dice": float(np.median(d)) if d.size else None,
              "cases_score_dice": {c: [float(a), float(b)] for c, a, b in zip(case_ids, s, d)}}
    return QualityModel(float(min_dice), threshold, envelope, dict(classes or {}), report, list(expected))


def calibration_lines(quality: QualityModel) -> list[str]:
    """The calibration in words (selection notes, the predict summary, the evaluation report)."""
    c = quality.calibration
    rho = c.get("spearman_score_dice")
    return [f"quality flag: score threshold {quality.threshold:.3f} for Dice {quality.min_dice:.3f} "
            f"({c.get('rule', '')}); on {c.get('cases', 0)} out-of-fold cases: Spearman(score, Dice) "
            f"{'-' if rho is None else f'{rho:.2f}'}, {c.get('worst_flagged', 0)} of the {c.get('worst_cases', 0)} "
            f"worst flagged, {c.get('flagged_above_min_dice', 0)} of the others flagged"]


# --- quality.json ------------------------------------------------------------------------------------------


def write_quality(cases: Mapping[str, CaseQuality], quality: QualityModel, path: Path | str) -> Path:
    """One ``quality.json`` for a prediction run: the calibration and an entry per case (written atomically)."""
    data = {**header("quality"), "min_dice": quality.min_dice, "threshold": quality.threshold,
            "calibration": quality.calibration, "cases": {k: cases[k].to_dict() for k in sorted(cases)}}
    write_json(json_safe(data), path)
    return Path(path)


def quality_lines(cases: Mapping[str, CaseQuality]) -> list[str]:
    """The run summary's quality column: one line per case, flagged ones with their reasons."""
    width = max([4, *(len(k) for k in cases)])
    lines = [f"  {'case':<{width}}  score  quality"]
    for k in sorted(cases):
        q = cases[k]
        lines.append(f"  {k:<{width}}  {q.score:5.3f}  " + ("FLAGGED: " + "; ".join(q.reasons) if q.flagged else "ok"))
    return lines


def read_quality(folder: Path | str) -> dict[str, Any] | None:
    """``folder/quality.json`` as written by :func:`write_quality`, or None when there is none (or it is not one)."""
    import json

    path = Path(folder) / QUALITY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("artifact") == "quality" else None


def flag_agreement(quality: Mapping[str, Any], dices: Mapping[str, float], min_dice: float | None = None
                   ) -> dict[str, Any]:
    """How a run's flags (``quality.json``'s content) match the real Dice of its cases (``dices``: case -> mean
    foreground Dice): cases below ``min_dice`` (default the calibration's) and how many were flagged, the
    others flagged, and the Spearman correlation of the score with the Dice."""
    from scipy.stats import spearmanr

    min_dice = float(quality.get("min_dice", 0.5)) if min_dice is None else min_dice
    cases = [c for c in sorted(dices) if c in quality.get("cases", {}) and not math.isnan(dices[c])]
    s = np.array([quality["cases"][c]["score"] for c in cases], float)
    d = np.array([dices[c] for c in cases], float)
    f = np.array([bool(quality["cases"][c]["flagged"]) for c in cases])
    low = d < min_dice
    rho = float(spearmanr(s, d)[0]) if len(cases) >= 3 and np.ptp(s) > 0 and np.ptp(d) > 0 else None
    return {"cases": len(cases), "min_dice": min_dice, "below_min_dice": int(low.sum()),
            "flagged_below_min_dice": int((f & low).sum()), "flagged_above_min_dice": int((f & ~low).sum()),
            "flagged": int(f.sum()), "spearman_score_dice": rho}
