"""``autoseg plan --search``: an Optuna study around the rules' configuration, inside the user's budget.

The rules' point is enqueued as the first trial and never pruned, so the chosen configuration is at least
as good as the rules' on the search's own measure; single changes to it come next (half the width, lighter
augmentation, ...: :data:`~autoseg.plan.search_space.NEIGHBOURS`; training without mirroring first when the
fingerprint finds a class on one side of the images), then TPE samples. Each trial is the
rules' configuration with a few values changed (:mod:`autoseg.plan.search_space`): its network is measured
on the device first and rejected when its memory does not fit; otherwise it trains for a short, fixed share of the search budget
on fold 0 (in ``WORKDIR/search/trial_<n>/``, never in ``runs/``), reports the patch Dice of each periodic
validation to a successive-halving pruner, and is scored at the end by the Dice of sliding-window
predictions of fold 0's held-out cases. The best trial becomes the configuration in plans.json; the rules'
configuration is kept beside it under ``search.rules``, and the best trial's weights under
``search.warm_start``: `autoseg train` starts fold 0's run of the chosen configuration from them, so the
search's training of the winner is not thrown away (the other folds, whose training sets differ, start fresh).

>>> result = plan_with_search("data/Dataset001_X", budget="20m", trials=12)  # doctest: +SKIP
>>> print(search_summary(result))                                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from autoseg.errors import UserError
from autoseg.plan import study as studies
from autoseg.plan.budget import format_duration
from autoseg.plan.model import PLANS_FILE, Configuration, Measurement, Plans, _build
from autoseg.plan.search_space import (
    SearchSpace,
    derive_space,
    has_time_to_spare,
    mirror_hides_side,
    neighbours,
    rule_params,
    suggest,
    to_configuration,
)

SEARCH_DIR = "search"
SEARCH_SHARE = 0.4  # of the total budget; the rest trains the chosen configuration
DEFAULT_TRIALS = 12
PRUNE_SAVING = 1.5  # pruned trials stop early, so each trial may take this times its even share
RUNGS = 4  # validations per trial: the pruner's rungs
MIN_TRIAL_SHARE = 0.25  # no new trial when less than this share of a trial's time is left
OVERHEAD_GUESS = 0.15  # of a trial's time, for start-up and scoring, until trials have measured it
MAX_SCORE_CASES = 8  # held-out cases of fold 0 scored per trial


@dataclass
class SearchBudget:
    """How the total wall-clock budget is divided between the search and the final training."""

    total_s: float
    search_s: float
    train_s: float
    trials: int
    trial_s: float

    def describe(self) -> str:
        return (f"budget {format_duration(self.total_s)}: search {format_duration(self.search_s)} "
                f"({self.trials} trials of up to {format_duration(self.trial_s)} each, stopped early when "
                f"behind), final training {format_duration(self.train_s)}")


def divide_budget(total_s: float, trials: int | None = None) -> SearchBudget:
    """``SEARCH_SHARE`` of the budget for the search, the rest for training; a trial's time is its even
    share of the search, times ``PRUNE_SAVING`` since most trials are stopped early."""
    n = DEFAULT_TRIALS if trials is None else trials
    if n < 1:
        raise UserError(f"--trials {n}: must be at least 1")
    search_s = total_s * SEARCH_SHARE
    return SearchBudget(total_s, search_s, total_s - search_s, n, PRUNE_SAVING * search_s / n)


def neighbour_count(trials: int) -> int:
    """How many single changes to the rules' point run before TPE samples: half the other trials, so TPE
    keeps the rest (6 trials: the rules' point, 2 single changes, 3 sampled)."""
    return max(0, (trials - 1) // 2)


def _mirror_hides_side(work: Path, plans: Plans, rules: Configuration) -> bool:
    """:func:`~autoseg.plan.search_space.mirror_hides_side` from the workdir's fingerprint (False without one)."""
    from autoseg.fingerprint import FINGERPRINT_FILE, Fingerprint

    if not (work / FINGERPRINT_FILE).is_file():
        return False
    return mirror_hides_side(Fingerprint.load(work / FINGERPRINT_FILE).classes, plans.axis_order, rules)


def study_name(plans: Plans, rules: Configuration) -> str:
    """One study per dataset and rules' point: a new rules' point (replanned) gets a new study."""
    digest = hashlib.sha256(json.dumps(asdict(rules), sort_keys=True).encode()).hexdigest()[:10]
    return f"autoseg-{plans.dataset_name}-{rules.name}-{digest}"


# --- one trial -------------------------------------------------------------------------------------------

def score_validation(model, workdir: Path, plans: Plans, cfg: Configuration, case_ids: list[str],
                     device: str) -> float:
    """Mean foreground Dice of sliding-window predictions of whole preprocessed cases: the same measure for
    every trial, whatever its patch (patch Dice is not: a larger patch holds more background)."""
    from autoseg.metrics import dice_per_class
    from autoseg.preprocess import PREPROCESSED_DIR, load_case
    from autoseg.sliding_window import sliding_window

    classes = sorted(plans.class_names)
    per_class: dict[int, list[float]] = {c: [] for c in classes}
    for cid in case_ids[:MAX_SCORE_CASES]:
        data, seg, _ = load_case(Path(workdir) / PREPROCESSED_DIR / cfg.name, cid)
        logits = sliding_window(model, np.asarray(data), cfg.patch_size, plans.num_classes, cfg.ndim, device,
                                overlap=0.5, precision=cfg.precision, channels_last=cfg.channels_last)
        ref = np.asarray(seg)
        ref = ref.reshape(ref.shape[-3:]) if ref.ndim > 3 else ref
        ref = np.where(ref < 0, 0, ref)  # -1: outside the nonzero mask, background
        for c, d in dice_per_class(logits.argmax(0).numpy(), ref, classes, plans.ignore_label).items():
            per_class[c].append(d)
    means = [np.nanmean(v) for v in per_class.values() if np.isfinite(v).any()]
    return float(np.mean(means)) if means else 0.0


@dataclass
class TrialRunner:
    """The objective: a trial's parameters -> a configuration -> memory check -> short training -> Dice.

    ``measure`` (configuration -> (seconds per step, peak bytes)) and ``evaluate`` (configuration, trial ->
    Dice) can be replaced, e.g. by cheap stand-ins in tests."""

    workdir: Path
    plans: Plans
    rules: Configuration
    space: SearchSpace
    settings: dict[str, Any]
    memory_limit: float
    device: str | None = None
    seed: int = 0
    workers: int | None = None
    deadline: float | None = None
    measure: Callable[[Configuration], tuple[float, float]] | None = None
    evaluate: Callable[[Configuration, optuna.Trial], float] | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space)
        try:
            cfg = to_configuration(self.space, self.rules, params)
        except UserError as e:
            trial.set_user_attr("rejected", f"invalid: {e}")
            raise optuna.TrialPruned() from None
        if cfg == self.rules:
            step_s, peak = cfg.measured.step_time_s, cfg.measured.peak_memory_mb * 2 ** 20
        else:
            step_s, peak = (self.measure or self._measure)(cfg)
        trial.set_user_attr("peak_memory_mb", round(peak / 2 ** 20, 1))
        trial.set_user_attr("step_time_s", round(step_s, 4))
        if peak > self.memory_limit:
            trial.set_user_attr("rejected", f"memory {peak / 2 ** 20:.0f} MiB > {self.memory_limit / 2 ** 20:.0f} MiB")
            raise optuna.TrialPruned()
        if cfg != self.rules:
            cfg = replace(cfg, measured=self._measurement(cfg, step_s, peak))
        trial.set_user_attr("parameters", cfg.measured.parameters)
        trial.set_user_attr("configuration", asdict(cfg))
        return (self.evaluate or self._train_and_score)(cfg, trial)

    def _measure(self, cfg: Configuration) -> tuple[float, float]:
        from autoseg.plan.compute import best_device, measure_step

        p = self.plans
        m, _ = measure_step(cfg.network, p.in_channels, p.num_classes, cfg.ndim, cfg.patch_size, cfg.batch_size,
                            (self.device or best_device()).split(":")[0], cfg.precision, cfg.channels_last, steps=1)
        return m.step_time_s, float(m.peak_memory_bytes)

    def _measurement(self, cfg: Configuration, step_s: float, peak: float) -> Measurement:
        import torch

        from autoseg.nets import build_network, count_parameters
        from autoseg.plan.compute import count_step_flops

        p = self.plans
        with torch.device("meta"):
            params = count_parameters(build_network(cfg.network, p.in_channels, p.num_classes, cfg.ndim))
        flops = count_step_flops(cfg.network, p.in_channels, p.num_classes, cfg.ndim, cfg.patch_size,
                                 cfg.batch_size)
        return Measurement(round(step_s, 4), round(peak / 2 ** 20, 1), int(params), round(flops / 1e9, 2),
                           self.rules.measured.precision_speedup, False)

    def _train_and_score(self, cfg: Configuration, trial: optuna.Trial) -> float:
        from autoseg.checkpoint import FINAL, LATEST
        from autoseg.crossval import load_splits
        from autoseg.oof import load_run_model
        from autoseg.plan.compute import best_device
        from autoseg.train import Trainer, cached_cases

        t0 = time.time()
        fold = int(self.settings.get("fold", 0))
        steps = self.settings.get("trial_steps")
        seconds = float(self.settings["trial_s"])
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - t0)
        seconds = max(1.0, seconds - _overhead(trial.study, seconds))  # the trial's time includes its scoring
        planned = int(steps or max(1, seconds / max(cfg.measured.step_time_s, 1e-6)))
        # at least 2: a timed run re-derives its total at each validation, always one step past it
        cfg = replace(cfg, schedule=replace(cfg.schedule, steps=planned, val_every=max(2, planned // RUNGS)))
        plans = replace(self.plans, configurations={**self.plans.configurations, cfg.name: cfg})
        folder = trial_folder(self.workdir, trial.number)
        shutil.rmtree(folder, ignore_errors=True)  # a number is never reused; a leftover is stale
        protected = bool(trial.user_attrs.get("rules"))
        rung, kept = 0, False

        def report(step: int, dice: float) -> None:
            nonlocal rung
            rung += 1
            trial.set_user_attr("steps", step)
            trial.report(float(dice) if math.isfinite(dice) else 0.0, rung)
            if not protected and trial.should_prune():
                trial.set_user_attr("pruned_at", f"validation {rung} of {RUNGS}")
                raise optuna.TrialPruned()

        device = self.device or best_device()
        try:
            run = Trainer(self.workdir, cfg.name, fold, plans=plans, seconds=None if steps else seconds,
                    steps=int(steps) if steps else None, device=self.device, seed=self.seed, workers=self.workers,
                    progress=False, folder=folder, on_validation=report).fit()
            val = load_splits(self.workdir, cached_cases(self.workdir, cfg.name), plans.folds)[fold]["val"]
            model = load_run_model(folder, plans, cfg.name, device)
            value = score_validation(model, self.workdir, plans, cfg, val, device)
            trial.set_user_attr("overhead_s", round(time.time() - t0 - run.seconds, 2))
            kept = True  # the final weights: the final training of this fold starts from the best trial's
            return value
        finally:
            for name in (LATEST,) if kept else (FINAL, LATEST):
                (folder / name).unlink(missing_ok=True)


def trial_folder(workdir: Path, number: int) -> Path:
    return Path(workdir) / SEARCH_DIR / f"trial_{number:04d}"


def _keep_best_weights(workdir: Path, study: optuna.Study, best: optuna.trial.FrozenTrial | None) -> str | None:
    """Delete the final weights of every finished trial but the best, whose path (relative to the workdir)
    is returned when it has them. Running trials (another worker's) are left alone."""
    from autoseg.checkpoint import FINAL

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if best is None or t.number != best.number:
            (trial_folder(workdir, t.number) / FINAL).unlink(missing_ok=True)
    if best is None or not (trial_folder(workdir, best.number) / FINAL).is_file():
        return None
    return (trial_folder(workdir, best.number) / FINAL).relative_to(workdir).as_posix()


def _overhead(study: optuna.Study, seconds: float) -> float:
    """Seconds a trial spends besides training (start-up, scoring): the median of the completed trials',
    else a guess of 15 %."""
    past = [t.user_attrs["overhead_s"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "overhead_s" in t.user_attrs]
    return float(np.median(past)) if past else OVERHEAD_GUESS * seconds


def _min_left(study: optuna.Study, trial_s: float) -> Callable[[], float]:
    """Seconds a new trial needs: a share of a trial's training time, and its start-up and scoring."""
    return lambda: MIN_TRIAL_SHARE * trial_s + _overhead(study, trial_s)


# --- the search as the CLI runs it ----------------------------------------------------------------------

@dataclass
class SearchResult:
    plan: Any  # autoseg.workflow.PlanResult
    budget: SearchBudget
    study: str
    storage: str
    summary: dict[str, Any]
    outputs: list[Path] = field(default_factory=list)
    ran: int = 0


def _primary(plans: Plans) -> str:
    return plans.train_runs[0]["configuration"] if plans.train_runs else next(iter(plans.configurations))


def rules_configuration(plans: Plans) -> Configuration:
    """The rules' configuration: kept under ``search.rules`` once a search has replaced it."""
    name = _primary(plans)
    kept = plans.search.get("rules")
    if kept and plans.search.get("configuration") == name:
        return _build(Configuration, kept, f"{PLANS_FILE}: search.rules")
    return plans.configurations[name]


def plan_with_search(dataset: Path | str, workdir: Path | str | None = None, *, budget: str | float | None = None,
                     trials: int | None = None, storage: str | None = None, planner: str = "default",
                     device: str | None = None, jobs: int | None = None, replan: bool = False,
                     progress: bool = True, folds: int | None = None, seed: int = 0,
                     workers: int | None = None, remeasure: bool = False) -> SearchResult:
    """Plan with the rules for the training share of ``budget``, then search around the rules' point for
    the search share (:func:`run_search`). Running it again resumes the study."""
    from autoseg.plan.compute import detect_device
    from autoseg.plan.make import resolve_budget
    from autoseg.workdir import resolve_workdir
    from autoseg.workflow import plan_dataset

    t0 = time.time()
    work = resolve_workdir(dataset, workdir)
    split = divide_budget(resolve_budget(budget, detect_device(device).type)[0], trials)
    studies.open_storage(storage, work)  # a bad --storage fails before the dataset is read
    result = plan_dataset(dataset, work, planner=planner, budget=split.train_s, device=device, jobs=jobs,
                          replan=replan, progress=progress, remeasure=remeasure,
                          **({} if folds is None else {"folds": folds}))
    found = run_search(work, split, storage=storage, device=device, seed=seed, workers=workers,
                       progress=progress, started=t0)
    result.plans = Plans.load(work / PLANS_FILE)
    found.plan = result
    return found


def run_search(workdir: Path | str, split: SearchBudget, *, storage: str | None = None, device: str | None = None,
               seed: int = 0, workers: int | None = None, progress: bool = True, started: float | None = None,
               trial_steps: int | None = None, memory_limit_mb: float | None = None,
               evaluate: Callable[[Configuration, optuna.Trial], float] | None = None,
               measure: Callable[[Configuration], tuple[float, float]] | None = None) -> SearchResult:
    """Search around the rules' configuration of ``WORKDIR/plans.json`` (planned and preprocessed) and write
    the best configuration back. The study is created, or resumed: finished trials count towards
    ``split.trials`` and their time towards ``split.search_s`` (as does the time since ``started``, the
    planning). ``trial_steps`` fixes each trial's length in steps instead of seconds (repeatable; tests)."""
    from autoseg.plan.compute import detect_device

    started = time.time() if started is None else started
    work = Path(workdir)
    store = studies.open_storage(storage, work)
    plans = Plans.load(work / PLANS_FILE)
    info = detect_device(device)
    limit = _memory_limit(memory_limit_mb, info)
    rules = rules_configuration(plans)
    name = study_name(plans, rules)
    study = studies.make_study(store, name, seed, split.trials)
    if "space" not in study.user_attrs:
        settings = {"space": derive_space(rules, limit).to_dict(), "trials": split.trials, "trial_s": split.trial_s,
                    "trial_steps": trial_steps, "fold": 0, "seed": seed, "budget": asdict(split)}
        for k, v in settings.items():
            study.set_user_attr(k, v)
    settings = dict(study.user_attrs)
    space = SearchSpace.from_dict(settings["space"])
    studies.fail_orphans(study)
    studies.enqueue_rules(study, rule_params(space, rules))
    moves = neighbours(space, rule_params(space, rules), wider_first=has_time_to_spare(rules),
                       mirror_first=_mirror_hides_side(work, plans, rules))
    studies.enqueue_neighbours(study, moves[:neighbour_count(split.trials)])
    deadline = None
    if not settings.get("trial_steps"):
        deadline = started + split.search_s - studies.spent_seconds(study)
    study.set_user_attr("deadline", deadline)
    shown = storage if storage is None or "://" not in storage else studies.redact(storage)
    plans.search = {**plans.search, "status": "running", "configuration": rules.name, "study": name,
                    "storage": shown, "rules": asdict(rules)}
    plans.save(work / PLANS_FILE)  # workers find the study here
    if progress:
        print(f"search: {split.describe()}", file=sys.stderr)
    runner = TrialRunner(work, plans, rules, space, settings, limit, device, seed, workers, deadline, measure, evaluate)
    ran = studies.run_trials(study, runner, split.trials, deadline, _min_left(study, split.trial_s),
                             _say if progress else None)
    summary, outputs = finalize(work, study, rules, shown)
    return SearchResult(None, split, name, shown or studies.default_storage(work), summary, outputs, ran)


def search_worker(workdir: Path | str, storage: str | None = None, trials: int | None = None,
                  device: str | None = None, seed: int | None = None, workers: int | None = None,
                  memory_limit_mb: float | None = None, progress: bool = True,
                  evaluate: Callable[[Configuration, optuna.Trial], float] | None = None,
                  measure: Callable[[Configuration], tuple[float, float]] | None = None) -> SearchResult:
    """Join the study ``autoseg plan --search`` started for ``workdir`` (a folder every worker can read,
    e.g. on a shared disk) and run trials until it has ``trials`` (default: the study's) or its deadline."""
    from autoseg.plan.compute import detect_device

    work = Path(workdir)
    plans = Plans.load(work / PLANS_FILE)
    name = plans.search.get("study")
    if not name:
        raise UserError(f"{work / PLANS_FILE}: no search study; run `autoseg plan DATASET --search` first")
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    spec = storage if storage is not None else plans.search.get("storage")
    if spec is not None and "***" in spec:
        raise UserError(f"{work / PLANS_FILE}: the study's storage has a password; pass it with --storage")
    store = studies.open_storage(spec, work)
    try:
        study = studies.load_study(store, name, os.getpid() if seed is None else seed)
    except KeyError:
        raise UserError(f"study {name} is not in storage {studies.redact(spec or studies.default_storage(work))}; "
                        "pass the --storage `autoseg plan --search` used") from None
    settings = dict(study.user_attrs)
    rules = rules_configuration(plans)
    info = detect_device(device)
    deadline = settings.get("deadline")
    runner = TrialRunner(work, plans, rules, SearchSpace.from_dict(settings["space"]), settings,
                         _memory_limit(memory_limit_mb, info), device, seed or 0, workers, deadline, measure, evaluate)
    n = trials or int(settings["trials"])
    budget = SearchBudget(**settings["budget"])
    ran = studies.run_trials(study, runner, n, deadline, _min_left(study, budget.trial_s), _say if progress else None)
    summary, outputs = finalize(work, study, rules, plans.search.get("storage"))
    return SearchResult(None, budget, name, spec or studies.default_storage(work), summary, outputs, ran)


def _memory_limit(memory_limit_mb: float | None, info) -> float:
    return memory_limit_mb * 2 ** 20 if memory_limit_mb else float(info.memory_bytes)


def _say(t: optuna.trial.FrozenTrial) -> None:
    from autoseg.plan.search_report import describe_trial

    print(f"search: {describe_trial(t)}", file=sys.stderr)


# --- the outcome ---------------------------------------------------------------------------------------

def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest Dice; on a tie, the rules' point, then the earliest."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, bool(t.user_attrs.get("rules")), -t.number))


def finalize(workdir: Path, study: optuna.Study, rules: Configuration,
             storage: str | None) -> tuple[dict[str, Any], list[Path]]:
    """Write the best trial's configuration into plans.json (its steps fitted to the training run's
    seconds), the rules' configuration beside it, and the trial table and plots under ``search/``. The best
    trial's weights are kept (the others' deleted) for the final training of its fold to start from: the
    search's training of the chosen configuration is not thrown away."""
    from autoseg.plan.search_report import write_outputs

    path = Path(workdir) / PLANS_FILE
    plans = Plans.load(path)
    best = best_trial(study)
    rules_trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rules")]
    rules_done = [t for t in rules_trials if t.state == TrialState.COMPLETE]
    chosen = rules
    if best is not None and not best.user_attrs.get("rules"):
        chosen = _build(Configuration, best.user_attrs["configuration"], f"study {study.study_name}")
        run_s = next((r["seconds"] for r in plans.train_runs if r["configuration"] == chosen.name), plans.budget_s)
        steps = max(1, int(run_s / max(chosen.measured.step_time_s, 1e-6)))
        chosen = replace(chosen, schedule=replace(chosen.schedule, steps=steps,
                                                  val_every=max(50, min(steps // 10, 1000))))
    plans.configurations[rules.name] = chosen
    states = [t.state for t in study.get_trials(deepcopy=False)]
    rejected = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rejected"))
    summary = {
        "status": "done", "configuration": rules.name, "study": study.study_name, "storage": storage,
        "best_trial": best.number if best is not None else None,
        "best_value": best.value if best is not None else None,
        "chosen": "rules" if chosen is rules else "search",
        "params": dict(best.params) if best is not None else {},
        "rules_trial": rules_done[0].number if rules_done else None,
        "rules_value": rules_done[0].value if rules_done else None,
        "trials": {"complete": states.count(TrialState.COMPLETE),
                   "pruned": states.count(TrialState.PRUNED) - rejected,
                   "rejected": rejected, "failed": states.count(TrialState.FAIL),
                   "running": states.count(TrialState.RUNNING)},
        "budget": study.user_attrs.get("budget", {}),
        "rules": asdict(rules)}
    weights = _keep_best_weights(Path(workdir), study, best)
    if weights is not None:  # `autoseg train` starts this fold's run from them (autoseg.workflow.warm_start)
        summary["warm_start"] = {"configuration": rules.name, "fold": int(study.user_attrs.get("fold", 0)),
                                 "checkpoint": weights, "trial": best.number}
    plans.search = summary
    plans.notes = [n for n in plans.notes if not n.startswith("search:")]
    if best is not None:
        plans.notes.append(f"search: trial {best.number} chosen, validation Dice {best.value:.4f}"
                           + (f" (rules' point {rules_done[0].value:.4f})" if rules_done else ""))
    plans.save(path)
    outputs = write_outputs(study, Path(workdir) / SEARCH_DIR)
    return summary, outputs


def search_summary(result: SearchResult) -> str:
    """What the search did and chose, for the terminal."""
    s = result.summary
    t = s["trials"]
    lines = [f"search: {result.budget.describe()}",
             f"search: study {result.study} in {result.storage}: {t['complete']} complete, {t['pruned']} pruned, "
             f"{t['rejected']} rejected (memory), {t['failed']} failed" + (f"; {result.ran} run now" if result.ran else "")]
    if s["best_trial"] is None:
        lines.append("search: no trial completed; the rules' configuration is kept")
    else:
        rules = f"{s['rules_value']:.4f}" if s["rules_value"] is not None else "n/a"
        lines.append(f"search: chose trial {s['best_trial']} ({s['chosen']}), validation Dice {s['best_value']:.4f} "
                     f"vs rules' point {rules}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["params"].items()))
    lines += [f"wrote {p}" for p in result.outputs]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
