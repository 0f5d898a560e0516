"""``autoseg plan --search``: an Optuna study around the rules' configuration, inside the user's budget.

The rules' point is enqueued as the first trial and never pruned, so the chosen configuration is at least
as good as the rules' on the search's own measure; single changes to it come next (half the width, lighter
augmentation, ...: :data:`~autoseg.search.space.NEIGHBOURS`; training without mirroring first when the
fingerprint finds a class on one side of the images), then TPE samples. Each trial is the
rules' configuration with a few values changed (:mod:`autoseg.search.space`): its network is measured
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
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autoseg.errors import UserError
from autoseg.plan.budget import format_duration
from autoseg.schema.plans import Configuration, Plans, build
from autoseg.search import study as studies
from autoseg.search.space import (
    SearchSpace,
    derive_space,
    has_time_to_spare,
    mirror_hides_side,
    neighbours,
    rule_params,
)
from autoseg.search.trial import TrialRunner, keep_best_weights, min_left
from autoseg.workdir import Workdir

logger = logging.getLogger(__name__)
SEARCH_SHARE = 0.4  # of the total budget; the rest trains the chosen configuration
DEFAULT_TRIALS = 12
PRUNE_SAVING = 1.5  # pruned trials stop early, so each trial may take this times its even share


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


def _mirror_hides_side(work: Workdir, plans: Plans, rules: Configuration) -> bool:
    """:func:`~autoseg.search.space.mirror_hides_side` from the workdir's fingerprint (False without one)."""
    fp = work.fingerprint_or_none()
    return fp is not None and mirror_hides_side(fp.classes, plans.axis_order, rules)


def study_name(plans: Plans, rules: Configuration) -> str:
    """One study per dataset and rules' point: a new rules' point (replanned) gets a new study."""
    digest = hashlib.sha256(json.dumps(asdict(rules), sort_keys=True).encode()).hexdigest()[:10]
    return f"autoseg-{plans.dataset_name}-{rules.name}-{digest}"


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
        return build(Configuration, kept, "plans: search.rules")
    return plans.configurations[name]


def plan_with_search(dataset: Path | str, workdir: Path | str | None = None, *, budget: str | float | None = None,
                     trials: int | None = None, storage: str | None = None, planner: str = "default",
                     device: str | None = None, jobs: int | None = None, replan: bool = False,
                     progress: bool = True, folds: int | None = None, seed: int = 0,
                     workers: int | None = None, remeasure: bool = False,
                     measurements_dir: Path | None = None) -> SearchResult:
    """Plan with the rules for the training share of ``budget``, then search around the rules' point for
    the search share (:func:`run_search`). Running it again resumes the study."""
    from autoseg.device import detect_device
    from autoseg.plan.make import resolve_budget
    from autoseg.workflow import plan_dataset

    t0 = time.time()
    work = Workdir.for_dataset(dataset, workdir).root
    split = divide_budget(resolve_budget(budget, detect_device(device).type)[0], trials)
    studies.open_storage(storage, work)  # a bad --storage fails before the dataset is read
    result = plan_dataset(dataset, work, planner=planner, budget=split.train_s, device=device, jobs=jobs,
                          replan=replan, progress=progress, remeasure=remeasure, measurements_dir=measurements_dir,
                          **({} if folds is None else {"folds": folds}))
    found = run_search(work, split, dataset=dataset, storage=storage, device=device, seed=seed, workers=workers,
                       progress=progress, started=t0)
    result.plans = Workdir(work).load_plans()
    found.plan = result
    return found


def run_search(workdir: Path | str, split: SearchBudget, *, dataset: Path | str | None = None,
               storage: str | None = None, device: str | None = None,
               seed: int = 0, workers: int | None = None, progress: bool = True, started: float | None = None,
               trial_steps: int | None = None, memory_limit_mb: float | None = None,
               evaluate: Callable[[Configuration, optuna.Trial], float] | None = None,
               measure: Callable[[Configuration], tuple[float, float]] | None = None) -> SearchResult:
    """Search around the rules' configuration of ``WORKDIR/plans.json`` (planned and preprocessed) and write
    the best configuration back. The study is created, or resumed: finished trials count towards
    ``split.trials`` and their time towards ``split.search_s`` (as does the time since ``started``, the
    planning). ``dataset`` (the raw dataset, whose labels score the trials) is kept in the study for workers.
    ``trial_steps`` fixes each trial's length in steps instead of seconds (repeatable; tests)."""
    from autoseg.device import detect_device

    started = time.time() if started is None else started
    wd = Workdir.of(workdir)
    work = wd.root
    store = studies.open_storage(storage, work)
    plans = wd.load_plans()
    info = detect_device(device)
    limit = _memory_limit(memory_limit_mb, info)
    rules = rules_configuration(plans)
    name = study_name(plans, rules)
    study = studies.make_study(store, name, seed, split.trials)
    if "space" not in study.user_attrs:
        settings = {"space": derive_space(rules, limit).to_dict(), "trials": split.trials, "trial_s": split.trial_s,
                    "trial_steps": trial_steps, "fold": 0, "seed": seed, "budget": asdict(split),
                    "dataset": None if dataset is None else str(Path(dataset).resolve())}
        for k, v in settings.items():
            study.set_user_attr(k, v)
    settings = dict(study.user_attrs)
    space = SearchSpace.from_dict(settings["space"])
    studies.fail_orphans(study)
    studies.enqueue_rules(study, rule_params(space, rules))
    moves = neighbours(space, rule_params(space, rules), wider_first=has_time_to_spare(rules),
                       mirror_first=_mirror_hides_side(wd, plans, rules))
    studies.enqueue_neighbours(study, moves[:neighbour_count(split.trials)])
    deadline = None
    if not settings.get("trial_steps"):
        deadline = started + split.search_s - studies.spent_seconds(study)
    study.set_user_attr("deadline", deadline)
    shown = storage if storage is None or "://" not in storage else studies.redact(storage)
    plans.search = {**plans.search, "status": "running", "configuration": rules.name, "study": name,
                    "storage": shown, "rules": asdict(rules)}
    wd.save_plans(plans)  # workers find the study here
    if progress:
        logger.info(f"search: {split.describe()}")
    runner = TrialRunner(work, _dataset(settings, dataset), plans, rules, space, settings, limit, device, seed,
                         workers, deadline, measure, evaluate)
    ran = studies.run_trials(study, runner, split.trials, deadline, min_left(study, split.trial_s),
                             _say if progress else None)
    summary, outputs = finalize(work, study, rules, shown)
    return SearchResult(None, split, name, shown or studies.default_storage(work), summary, outputs, ran)


def search_worker(workdir: Path | str, storage: str | None = None, trials: int | None = None,
                  device: str | None = None, seed: int | None = None, workers: int | None = None,
                  memory_limit_mb: float | None = None, progress: bool = True, dataset: Path | str | None = None,
                  evaluate: Callable[[Configuration, optuna.Trial], float] | None = None,
                  measure: Callable[[Configuration], tuple[float, float]] | None = None) -> SearchResult:
    """Join the study ``autoseg plan --search`` started for ``workdir`` (a folder every worker can read,
    e.g. on a shared disk) and run trials until it has ``trials`` (default: the study's) or its deadline.
    ``dataset`` overrides where the study says the raw dataset is (another machine's path to it)."""
    from autoseg.device import detect_device

    wd = Workdir.of(workdir)
    work = wd.root
    plans = wd.load_plans()
    name = plans.search.get("study")
    if not name:
        raise UserError(f"{wd.plans_file}: no search study; run `autoseg plan DATASET --search` first")
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    spec = storage if storage is not None else plans.search.get("storage")
    if spec is not None and "***" in spec:
        raise UserError(f"{wd.plans_file}: the study's storage has a password; pass it with --storage")
    store = studies.open_storage(spec, work)
    try:
        study = studies.load_study(store, name, os.getpid() if seed is None else seed)
    except KeyError:
        raise UserError(f"study {name} is not in storage {studies.redact(spec or studies.default_storage(work))}; "
                        "pass the --storage `autoseg plan --search` used") from None
    settings = dict(study.user_attrs)
    studies.fail_orphans(study)  # a worker of this machine that died: its trial is not running any more
    rules = rules_configuration(plans)
    info = detect_device(device)
    deadline = settings.get("deadline")
    runner = TrialRunner(work, _dataset(settings, dataset), plans, rules, SearchSpace.from_dict(settings["space"]),
                         settings, _memory_limit(memory_limit_mb, info), device, seed or 0, workers, deadline, measure,
                         evaluate)
    n = trials or int(settings["trials"])
    budget = SearchBudget(**settings["budget"])
    ran = studies.run_trials(study, runner, n, deadline, min_left(study, budget.trial_s), _say if progress else None)
    summary, outputs = finalize(work, study, rules, plans.search.get("storage"))
    return SearchResult(None, budget, name, spec or studies.default_storage(work), summary, outputs, ran)


def _memory_limit(memory_limit_mb: float | None, info) -> float:
    return memory_limit_mb * 2 ** 20 if memory_limit_mb else float(info.memory_bytes)


def _dataset(settings: dict[str, Any], given: Path | str | None) -> Path | None:
    """The raw dataset whose labels score the trials: given here, else the one the study was started on."""
    where = given if given is not None else settings.get("dataset")
    return None if where is None else Path(where)


def _say(t: optuna.trial.FrozenTrial) -> None:
    from autoseg.search.report import describe_trial

    logger.info(f"search: {describe_trial(t)}")


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
    search's training of the chosen configuration is not thrown away. One worker at a time (a lock): two that
    end together would otherwise each keep the best of what it saw and delete the other's best weights."""
    from autoseg.claims import wait_claim

    with wait_claim(Workdir.of(workdir).search_lock):
        return _finalize(workdir, study, rules, storage)


def _finalize(workdir: Path, study: optuna.Study, rules: Configuration,
              storage: str | None) -> tuple[dict[str, Any], list[Path]]:
    from autoseg.search.report import write_outputs

    wd = Workdir.of(workdir)
    plans = wd.load_plans()
    best = best_trial(study)
    rules_trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rules")]
    rules_done = [t for t in rules_trials if t.state == TrialState.COMPLETE]
    chosen = rules
    if best is not None and not best.user_attrs.get("rules"):
        chosen = build(Configuration, best.user_attrs["configuration"], f"study {study.study_name}")
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
    weights = keep_best_weights(wd, study, best)
    if weights is not None:  # `autoseg train` starts this fold's run from them (autoseg.workflow.warm_start)
        summary["warm_start"] = {"configuration": rules.name, "fold": int(study.user_attrs.get("fold", 0)),
                                 "checkpoint": weights, "trial": best.number}
    plans.search = summary
    plans.notes = [n for n in plans.notes if not n.startswith("search:")]
    if best is not None:
        plans.notes.append(f"search: trial {best.number} chosen, validation Dice {best.value:.4f}"
                           + (f" (rules' point {rules_done[0].value:.4f})" if rules_done else ""))
    wd.save_plans(plans)
    outputs = write_outputs(study, wd)
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
