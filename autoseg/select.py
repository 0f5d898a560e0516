"""Model selection from out-of-fold predictions: which configuration, which ensemble, which post-processing.

Every case of a trained fold's held-out set was predicted and stored at its original geometry
(:mod:`autoseg.oof`); scoring those against the raw reference labels is the cross-validation estimate
this stage compares models by (mean foreground Dice: mean over classes of the mean over cases; for a region
dataset the classes are the regions, e.g. whole tumour, tumour core, enhancing tumour).

1. Each configuration is scored on the cases its folds predicted; the best single one is ranked on the
   cases every configuration predicted (when they share any), so a run with fewer folds is not compared
   on other cases.
2. Greedy forward selection: starting from the best single configuration, the configuration whose
   probabilities, averaged in, raise the mean Dice most is added, on the cases all members cover, as long
   as the mean rises and no class's mean falls (the same rule as for post-processing, DESIGN §5).
3. Post-processing is tuned for the chosen model: first a factor per class on the summed out-of-fold
   probabilities before the argmax (:func:`autoseg.postprocess.tune_class_weights`; not for region models),
   then the label-map rules on the label maps those give (:func:`autoseg.postprocess.tune_postprocessing`).

4. The quality flag is calibrated on the chosen model's out-of-fold cases (:mod:`autoseg.quality`): the score
   each case would get, against its real Dice, sets the threshold for "likely below ``min_dice``"; the
   training images give the input envelope (one more read of each); the fingerprint gives each class's range
   of volumes and of centroid positions (the labels are not read again).

5. Instance datasets (the plan has instance classes): each trained configuration's out-of-fold instance maps
   (``validation/instances/``, :mod:`autoseg.oof`: its detections, interior + watershed or components) are
   matched to the reference instances (``instancesTr``, else the components of the label map) one-to-one at
   IoU > 0.5 (:mod:`autoseg.lesionwise`). Panoptic quality and instance F1 are pooled over the instance classes
   and over the cases every compared configuration covers (as the Dice ranking), and the configuration with
   the highest PQ makes the instances ``autoseg predict`` writes. The semantic model stays the one chosen by
   Dice: the two questions are answered apart (Mask R-CNN may find nuclei best and paint them worst). Runs
   validated before instance maps were kept (no ``instances/``) are left out with a note.

The choice goes to ``WORKDIR/selection.json``: ``ensemble`` (the configurations, in the order they were
added; ``configuration`` is the first) and ``postprocessing``, the rules tuned for that model.
``autoseg predict`` averages the ensemble's probabilities the way they were scored here
(:mod:`autoseg.ensemble`) and applies those rules. ``postprocessing_by_model`` holds the rules of every model
tuned (``a+b`` and, for ``autoseg predict --config a``, the first member ``a`` alone). ``instances``
(:class:`autoseg.schema.selection.InstanceChoice`, instance datasets only) names the configuration whose
instance maps predict makes, with the PQ and F1 of every configuration compared.

>>> selection = select_model("autoseg_work/Dataset001_Liver", "Dataset001_Liver")   # doctest: +SKIP
>>> print(selection_table(selection))                                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.dataset import Case
from autoseg.errors import UserError
from autoseg.fingerprint import case_instances
from autoseg.io import read_images, read_label
from autoseg.lesionwise import LesionCounts, case_lesionwise, pooled
from autoseg.parallel import map_cases
from autoseg.postprocess import (
    MIN_GAIN,
    CaseLabels,
    Counts,
    acceptable,
    case_counts,
    describe,
    mean_dice,
    size_bases,
    size_bases_from_references,
    split_weights,
    tune_class_weights,
    tune_postprocessing,
    weighted_argmax,
)
from autoseg.quality import (
    Envelope,
    InputFeatures,
    QualityModel,
    calibrate,
    calibration_lines,
    class_confidence,
    class_ranges,
    expected_channels,
    input_features,
    score_of,
)
from autoseg.regions import regions_to_labels
from autoseg.schema.labels import ClassKey, key_values
from autoseg.schema.plans import Plans
from autoseg.schema.selection import InstanceChoice, Selection, model_name
from autoseg.workdir import RunDir, Workdir

Members = tuple[str, ...]


@dataclass
class RunOutputs:
    """The out-of-fold outputs of one configuration: case id -> the run whose validation holds them."""

    name: str
    folds: list[int] = field(default_factory=list)
    cases: dict[str, RunDir] = field(default_factory=dict)
    fold_of: dict[str, int] = field(default_factory=dict)


def find_oof(workdir: Workdir | Path | str) -> dict[str, RunOutputs]:
    """Configurations with at least one fold whose validation finished (its summary is written last)."""
    runs: dict[str, RunOutputs] = {}
    for name, fold, run in Workdir.of(workdir).runs():
        cases = run.oof_cases()
        if cases is None:
            continue
        outputs = runs.setdefault(name, RunOutputs(name))
        outputs.folds.append(fold)
        outputs.cases.update({c: run for c in cases})
        outputs.fold_of.update({c: fold for c in cases})
    return {k: v for k, v in runs.items() if v.cases}


class _Scorer:
    """Per-case Dice counts of models (tuples of configurations), computed once and kept by case."""

    def __init__(self, runs: dict[str, RunOutputs], refs: dict[str, Path], classes: list[ClassKey],
                 ignore: int | None, ending: str, regions_class_order: list[int] | None = None):
        self.runs, self.refs, self.classes, self.ignore, self.ending = runs, refs, classes, ignore, ending
        self.regions_class_order = regions_class_order or []  # set: the probabilities are regions'
        self.counts: dict[Members, dict[str, Counts]] = {}

    def cover(self, members: Iterable[str]) -> set[str]:
        sets = [set(self.runs[m].cases) for m in members]
        return set.intersection(*sets) & set(self.refs) if sets else set()

    def reference(self, cid: str) -> tuple[np.ndarray, tuple[float, ...]]:
        ref, geometry = read_label(self.refs[cid])
        return ref, geometry.spacing

    def probabilities(self, name: str, cid: str) -> np.ndarray:
        with np.load(self.runs[name].cases[cid].oof_probabilities(cid)) as f:
            return f["probabilities"].astype(np.float32)

    def labels(self, members: Members, cid: str, total: np.ndarray | None = None,
               weights: dict[int, float] | None = None) -> np.ndarray:
        """The model's label map: a single configuration's exported one, an ensemble's mean-probability argmax
        or, for regions, its regions painted where their mean is above 0.5 (``total``: the members' summed
        probabilities when the caller has them; ``weights``: a tuned ``class_weights`` rule's factors), as
        :func:`autoseg.ensemble.combine` makes it."""
        if len(members) == 1 and total is None and not weights:
            path = self.runs[members[0]].cases[cid].oof_labels(cid, self.ending)
            if path.is_file():
                return read_label(path)[0]
        if total is None:
            total = self.total(members, cid)
        if self.regions_class_order:
            return regions_to_labels(total, self.regions_class_order, len(members))
        return weighted_argmax(total, weights or {})

    def total(self, members: Members, cid: str) -> np.ndarray:
        """The members' out-of-fold probabilities of ``cid``, summed in ensemble order."""
        return sum(self.probabilities(m, cid) for m in members)

    def _store(self, members: Members, cid: str, pred: np.ndarray, ref: np.ndarray) -> None:
        if pred.shape != ref.shape:
            raise UserError(f"{self.runs[members[-1]].cases[cid].validation}: out-of-fold prediction of {cid} has shape "
                            f"{pred.shape}, its reference {self.refs[cid]} {ref.shape}; the dataset changed "
                            "since training: delete the runs' validation folders and train again")
        self.counts.setdefault(members, {})[cid] = case_counts(pred, ref, self.classes, self.ignore)

    def score_singles(self, names: list[str]) -> None:
        for cid in sorted(set().union(*(self.cover([n]) for n in names))):
            ref, _ = self.reference(cid)
            for n in names:
                if cid in self.runs[n].cases:
                    self._store((n,), cid, self.labels((n,), cid), ref)

    def score_additions(self, ensemble: Members, candidates: list[str]) -> None:
        """Count ``ensemble + (c,)`` for every candidate, loading each case's members once."""
        for cid in sorted(self.cover(ensemble)):
            todo = [c for c in candidates if cid in self.runs[c].cases and cid not in self.counts.get((*ensemble, c), {})]
            if not todo:
                continue
            ref, _ = self.reference(cid)
            base = sum(self.probabilities(m, cid) for m in ensemble)
            for c in todo:
                self._store((*ensemble, c), cid, self.labels((*ensemble, c), cid, base + self.probabilities(c, cid)), ref)

    def score(self, members: Members, cases: Iterable[str]) -> tuple[dict[ClassKey, float | None], float | None]:
        return mean_dice([self.counts[members][c] for c in sorted(cases)], self.classes)

    def record(self, members: Members, names: dict[ClassKey, str]) -> dict:
        cases = self.cover(members)
        per_class, mean = self.score(members, cases)
        folds = sorted({self.runs[m].fold_of[c] for m in members for c in cases})
        return {"members": list(members), "folds": folds, "cases": len(cases),
                "mean_dice": {names[c]: v for c, v in per_class.items()}, "foreground_mean_dice": mean}


def greedy_ensemble(scorer: _Scorer, names: list[str]) -> tuple[Members, list[dict]]:
    """Best single configuration, then greedy forward additions; returns (members, one log entry per step)."""
    scorer.score_singles(names)
    common = scorer.cover(names)
    ranked = {n: scorer.score((n,), common or scorer.cover([n]))[1] for n in names}
    ensemble: Members = (max(names, key=lambda n: -1.0 if ranked[n] is None else ranked[n]),)
    steps = [{"start": ensemble[0], "ranked_on_cases": len(common) if common else None, "scores": ranked}]
    while True:
        candidates = [n for n in names if n not in ensemble and scorer.cover((*ensemble, n))]
        if not candidates:
            break
        scorer.score_additions(ensemble, candidates)
        trials, best, gain = {}, None, 0.0
        for c in candidates:
            on = scorer.cover((*ensemble, c))
            old, new = scorer.score(ensemble, on), scorer.score((*ensemble, c), on)
            ok = acceptable(new, old)
            trials[c] = {"cases": len(on), "before": old[1], "after": new[1], "acceptable": ok}
            if ok and new[1] - old[1] > gain:
                best, gain = c, new[1] - old[1]
        steps.append({"ensemble": list(ensemble), "candidates": trials, "added": best})
        if best is None or gain <= MIN_GAIN:
            break
        ensemble = (*ensemble, best)
    return ensemble, steps


def _tune(scorer: _Scorer, members: Members, fingerprint: object | None, names: dict[ClassKey, str]) -> dict:
    """Post-processing rules for one model (class weights, then label-map rules), with the log of every
    candidate tried."""
    ids = sorted(scorer.cover(members))
    weight_rules, weight_log = [], []
    if not scorer.regions_class_order:
        def totals():
            for cid in ids:
                yield scorer.total(members, cid), scorer.reference(cid)[0]

        weight_rules, weight_log = tune_class_weights(totals, scorer.classes, scorer.ignore)
    weights = split_weights(weight_rules)[0]
    cases = []
    for cid in ids:
        ref, spacing = scorer.reference(cid)
        cases.append(CaseLabels.cropped(cid, scorer.labels(members, cid, weights=weights), ref, spacing))
    bases = size_bases(fingerprint, scorer.classes)
    missing = [c for c in scorer.classes if c not in bases]  # no fingerprint, or a region of several values
    bases.update(size_bases_from_references(cases, missing) if missing else {})
    rules, log = tune_postprocessing(cases, scorer.classes, scorer.ignore, bases)
    rules, log = weight_rules + rules, weight_log + log
    before = log[0]["before"] if log else None
    after = next((e["after"] for e in reversed(log) if e["kept"]), before)
    return {"model": list(members), "rules": rules, "cases": len(cases),
            "foreground_mean_dice_before": before, "foreground_mean_dice_after": after,
            "tried": [{"rule": describe(e["rule"], names), "before": e["before"], "after": e["after"],
                       "acceptable": e["acceptable"], "kept": e["kept"]} for e in log]}


def _case_features(images: tuple[Path, ...]) -> InputFeatures:
    return input_features(*read_images(images))


def calibrate_quality(scorer: _Scorer, members: Members, cases: list, fingerprint: object | None,
                      min_dice: float | None = None, jobs: int = 1) -> QualityModel:
    """The quality flag of model ``members``: the envelope of the training images ``cases`` (dataset cases),
    the classes' volume and position ranges from the fingerprint (none without one) and the score's threshold
    from its out-of-fold cases (their mean foreground Dice before post-processing)."""
    envelope = Envelope.of(map_cases(_case_features, [c.images for c in cases], jobs))
    ranges = class_ranges(fingerprint) if fingerprint is not None else {}
    sigmoid = bool(scorer.regions_class_order)
    expected = expected_channels(ranges, sigmoid)
    scores, dices, ids = [], [], []
    for cid in sorted(scorer.cover(members)):
        dice = scorer.score(members, [cid])[1]
        if dice is None:  # every class empty in both: no Dice to predict
            continue
        total = scorer.total(members, cid) / len(members)
        scores.append(score_of(class_confidence(total, sigmoid), expected))
        dices.append(dice)
        ids.append(cid)
    return calibrate(scores, dices, envelope, ranges, min_dice, expected, ids)


def instance_cases(outputs: RunOutputs, refs: set[str], ending: str) -> tuple[set[str], list[int]]:
    """The cases of ``outputs`` with an out-of-fold instance map and a reference, and the folds whose
    validation has no ``instances/`` (validated before instance maps were kept)."""
    cases = {c for c, run in outputs.cases.items() if c in refs and run.oof_instances(c, ending).is_file()}
    older = sorted({outputs.fold_of[c] for c, run in outputs.cases.items() if not run.oof_instances_dir.is_dir()})
    return cases, older


def _instance_counts(outputs: RunOutputs, case: Case, ref: np.ndarray, ref_ids: np.ndarray, classes: dict[str, int],
                     ending: str) -> LesionCounts:
    """One configuration's out-of-fold instances of one case against the reference's, pooled over the
    instance classes (one-to-one matching at IoU > 0.5)."""
    run = outputs.cases[case.id]
    pred, _ = read_label(run.oof_labels(case.id, ending))
    pred_ids, _ = read_label(run.oof_instances(case.id, ending))
    if pred.shape != ref.shape or pred_ids.shape != ref.shape:
        raise UserError(f"{run.validation}: out-of-fold prediction of {case.id} has shape {pred_ids.shape}, its "
                        f"reference {case.label} {ref.shape}; the dataset changed since training: delete the "
                        "runs' validation folders and train again")
    matchings = case_lesionwise(ref, pred, classes, ref_ids, pred_ids, modes=("iou",))
    return pooled(m["iou"].counts() for m in matchings.values())


def _score(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def choose_instances(runs: dict[str, RunOutputs], names: list[str], cases: dict[str, Case], plans: Plans) -> InstanceChoice:
    """Rank the configurations ``names`` (in plan order: the first wins a tie) by out-of-fold panoptic quality
    on the cases they all cover (each on its own when they share none); ``cases``: the dataset's training
    cases with a label, by id."""
    classes = {plans.class_names[v]: v for v in plans.instance_values}
    ending, covered, skipped = plans.file_ending, {}, []
    for n in names:
        found, older = instance_cases(runs[n], set(cases), ending)
        if older:
            folds = ", ".join(map(str, older))
            skipped.append(f"{n}: fold(s) {folds} validated without out-of-fold instance maps (an older run): "
                           + ("left out" if not found else "their cases left out"))
        if found:
            covered[n] = found
    compared = [n for n in names if n in covered]
    if not compared:
        return InstanceChoice(configuration=None, skipped=skipped)
    common = set.intersection(*covered.values())
    counts: dict[str, list[LesionCounts]] = {n: [] for n in compared}
    for cid in sorted(set.union(*covered.values())):
        todo = [n for n in compared if cid in (common or covered[n])]
        if not todo:
            continue
        ref, _ = read_label(cases[cid].label)
        ref_ids = case_instances(cases[cid], ref, plans.instance_values)
        for n in todo:
            counts[n].append(_instance_counts(runs[n], cases[cid], ref, ref_ids, classes, ending))
    scores = {n: pooled(c).scores() for n, c in counts.items()}
    pq = {n: _score(s["pq"]) for n, s in scores.items()}
    best = max(compared, key=lambda n: -1.0 if pq[n] is None else pq[n])
    return InstanceChoice(configuration=best, pq=pq, f1={n: _score(s["f1"]) for n, s in scores.items()},
                          cases=len(common) if common else None,
                          methods={n: plans.configurations[n].instances.method for n in compared}, skipped=skipped)


def select_model(workdir: Workdir | Path | str, dataset_dir: Path | str, postprocessing: bool = True,
                 min_dice: float | None = None, jobs: int = 1) -> Selection:
    """Score every configuration's out-of-fold outputs, pick the model and its post-processing, calibrate
    its quality flag (``min_dice``: the Dice a flag warns of; default the out-of-fold median minus a margin),
    write ``WORKDIR/selection.json`` and return it. Works from one configuration with one fold."""
    from autoseg.dataset import load_dataset

    work = Workdir.of(workdir)
    plans = work.load_plans()
    runs = {k: v for k, v in find_oof(work).items() if k in plans.configurations}
    if not runs:
        raise UserError(f"{work.runs_dir}: no out-of-fold predictions (no fold's validation has finished); "
                        "run `autoseg train` first")
    refs = {c.id: c.label for c in load_dataset(dataset_dir).cases("Tr") if c.label is not None and c.label.is_file()}
    names = plans.scored_classes  # label values, or regions
    segment_codes = dataset_segment_codes(dataset_dir, list(names.values()))  # a bad one fails before the scoring
    scorer = _Scorer(runs, refs, list(names), plans.ignore_label, plans.file_ending,
                     plans.regions_class_order if plans.regions else None)
    order = [r["configuration"] for r in plans.train_runs] + list(plans.configurations)
    scored = sorted((n for n in runs if scorer.cover([n])), key=order.index)
    if not scored:
        raise UserError(f"{dataset_dir}: none of the out-of-fold cases in {work.root} has a reference label here; "
                        "give the dataset the model was trained on")
    ensemble, steps = greedy_ensemble(scorer, scored)
    models = sorted(scorer.counts, key=lambda m: (len(m), [order.index(n) for n in m]))
    selection = Selection(configuration=ensemble[0], ensemble=list(ensemble),
                          classes={",".join(map(str, key_values(c))): n for c, n in names.items()},
                          cv={model_name(m): scorer.record(m, names) for m in models}, greedy=steps,
                          postprocessing_by_model={model_name(m): [] for m in dict.fromkeys([ensemble, ensemble[:1]])})
    if postprocessing:
        fp = work.fingerprint_or_none()
        tuned = _tune(scorer, ensemble, fp, names)
        selection.postprocessing, selection.postprocessing_tuning = tuned["rules"], tuned
        selection.postprocessing_by_model[model_name(ensemble)] = tuned["rules"]
        if len(ensemble) > 1:
            first = _tune(scorer, ensemble[:1], fp, names)
            selection.configuration_postprocessing_tuning = first
            selection.postprocessing_by_model[ensemble[0]] = first["rules"]
    cases = [c for c in load_dataset(dataset_dir).cases("Tr") if c.id in refs]
    selection.quality = calibrate_quality(scorer, ensemble, cases, work.fingerprint_or_none(), min_dice,
                                          jobs).to_dict()
    if plans.instance_classes:
        selection.instances = choose_instances(runs, scored, {c.id: c for c in cases}, plans)
    selection.segment_codes = segment_codes
    selection = Selection.from_dict(selection.to_dict(), "selection")  # as it reads back: NaN scores as None
    work.save_selection(selection)
    return selection


def dataset_segment_codes(dataset_dir: Path | str, class_names: list[str]) -> dict[str, dict[str, str]]:
    """dataset.json's ``segment_codes`` (class name -> coded category and type for DICOM SEG output), checked as
    a ``--segment-codes`` file is: the selection keeps them so that the bundle, and so every site, carries them."""
    from autoseg.dataset import load_dataset
    from autoseg.schema.segment_codes import check_codes, codes_to_json, parse_segment_codes

    raw = load_dataset(dataset_dir).raw.get("segment_codes")
    if raw is None:
        return {}
    where = f"{Path(dataset_dir) / 'dataset.json'}: segment_codes"
    codes = parse_segment_codes(raw, where)
    check_codes(codes, class_names, where)
    return codes_to_json(codes)


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def _verdict(tried: dict) -> str:
    if tried["kept"]:
        return "kept"
    if tried["acceptable"]:
        return "beaten by another " + ("factor" if tried["rule"].startswith("class_weights") else "size")
    rose = tried["after"] is not None and (tried["before"] is None or tried["after"] > tried["before"])
    return "refused: a class falls" if rose else "no gain"


def selection_table(selection: Selection) -> str:
    """The choice as a readable table: per-model CV Dice, the greedy steps and the post-processing tried."""
    names = list(selection.classes.values())
    chosen = selection.model
    width = max(12, *(len(k) for k in selection.cv))
    lines = ["out-of-fold mean Dice (foreground mean and per class)",
             f"  {'model':<{width}} {'folds':>9} {'cases':>5}   mean " + " ".join(f"{n[:8]:>8}" for n in names)]
    for key, r in selection.cv.items():
        folds = ",".join(map(str, r["folds"]))
        mark = "  <- chosen" if key == chosen else ""
        lines.append(f"  {key:<{width}} {folds:>9} {r['cases']:>5} {_fmt(r['foreground_mean_dice'])} "
                     + " ".join(f"{_fmt(r['mean_dice'].get(n)):>8}" for n in names) + mark)
    for step in selection.greedy[1:]:
        tried = ", ".join(f"+{c} {_fmt(t['before']).strip()}->{_fmt(t['after']).strip()} on {t['cases']}"
                          + ("" if t["acceptable"] else " (refused)") for c, t in step["candidates"].items())
        lines.append(f"  greedy from {'+'.join(step['ensemble'])}: {tried}; "
                     + (f"added {step['added']}" if step["added"] else "stop"))
    for pp, label in ((selection.postprocessing_tuning, chosen),
                      (selection.configuration_postprocessing_tuning, f"{selection.configuration} alone (--config)")):
        if not pp:
            continue
        lines.append(f"post-processing tuned for {label} ({len(pp['rules'])} rule(s) kept):")
        lines += [f"  {_verdict(t):<22} {t['rule']:<36} {_fmt(t['before']).strip()} -> {_fmt(t['after']).strip()}"
                  for t in pp["tried"]]
    if selection.quality:
        lines += calibration_lines(QualityModel.from_dict(selection.quality))
    if selection.instances is not None:
        lines += instance_lines(selection.instances)
    kind = "the ensemble" if len(selection.ensemble) > 1 else "configuration"
    lines.append(f"predict uses {kind} {chosen} with {len(selection.postprocessing)} post-processing rule(s)")
    if selection.instances is not None and selection.instances.configuration is not None:
        lines.append(f"predict makes the instances with {selection.instances.configuration} "
                     f"({selection.instances.methods.get(selection.instances.configuration, '?')})")
    return "\n".join(lines)


def instance_lines(choice: InstanceChoice) -> list[str]:
    """The instance ranking as table lines: PQ and F1 per configuration, and the runs left out."""
    on = f"on the {choice.cases} case(s) all cover" if choice.cases else "each on its own cases"
    lines = [f"out-of-fold instances (pooled over the instance classes, {on}; IoU > 0.5)"]
    if choice.pq:
        width = max(12, *(len(k) for k in choice.pq))
        lines.append(f"  {'configuration':<{width}} {'method':<10}     PQ     F1")
        for name, pq in choice.pq.items():
            mark = "  <- instances" if name == choice.configuration else ""
            lines.append(f"  {name:<{width}} {choice.methods.get(name, '?'):<10} {_fmt(pq)} "
                         f"{_fmt(choice.f1.get(name))}{mark}")
    else:
        lines.append("  no configuration has out-of-fold instance maps: predict makes them from its model")
    lines += [f"  skipped {note}" for note in choice.skipped]
    return lines
