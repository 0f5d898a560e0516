"""One trial of the search: a trial's parameters -> a configuration -> memory check -> short training on
fold 0 -> the Dice of its held-out cases, predicted by the inference engine in their original geometry and
scored against the raw labels, as the out-of-fold validation does.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from autoseg.errors import UserError
from autoseg.schema.plans import Configuration, Measurement, Plans
from autoseg.search.space import SearchSpace, suggest, to_configuration
from autoseg.workdir import RunDir, Workdir

RUNGS = 4  # validations per trial: the pruner's rungs
MIN_TRIAL_SHARE = 0.25  # no new trial when less than this share of a trial's time is left
OVERHEAD_GUESS = 0.15  # of a trial's time, for start-up and scoring, until trials have measured it
MAX_SCORE_CASES = 8  # held-out cases of fold 0 scored per trial


def score_trial(run: RunDir, work: Workdir, dataset: Path | None, plans: Plans, configuration: str, fold: int,
                case_ids: list[str], device: str) -> float:
    """Mean foreground Dice (region datasets: mean region Dice) of the trial's predictions of (up to :data:`MAX_SCORE_CASES` of) the fold's
    held-out cases: the inference engine from the preprocessed cache to the original geometry, against the
    raw labels. The same measure for every trial, whatever its patch or spacing, and what the final model's
    cross-validation reports."""
    from autoseg.dataset import load_dataset
    from autoseg.io import read_label
    from autoseg.metrics import dice_per_class
    from autoseg.oof import fold_predictor, predict_cached

    if dataset is None or not Path(dataset).is_dir():
        raise UserError(f"dataset folder {dataset}: not found; a search trial is scored against the dataset's "
                        "labels (pass --dataset to `autoseg search-worker`)")
    labels = {c.id: c.label for c in load_dataset(dataset).cases("Tr")}
    predictor = fold_predictor(run, plans, configuration, fold, device)
    classes = list(plans.scored_classes)  # label values, or regions
    per_class: dict = {c: [] for c in classes}
    for cid in case_ids[:MAX_SCORE_CASES]:
        seg, _, _ = predict_cached(predictor, work.preprocessed(configuration), cid)
        ref, _ = read_label(labels[cid])
        for c, d in dice_per_class(seg, ref, classes, plans.ignore_label).items():
            per_class[c].append(d)
    means = [np.nanmean(v) for v in per_class.values() if np.isfinite(v).any()]
    return float(np.mean(means)) if means else 0.0


@dataclass
class TrialRunner:
    """The objective: a trial's parameters -> a configuration -> memory check -> short training -> Dice.

    ``measure`` (configuration -> (seconds per step, peak bytes)) and ``evaluate`` (configuration, trial ->
    Dice) can be replaced, e.g. by cheap stand-ins in tests."""

    workdir: Path
    dataset: Path | None  # the raw dataset, whose labels score a trial (not needed with ``evaluate``)
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
        from autoseg.device import best_device
        from autoseg.plan.compute import measure_step

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
        from autoseg.crossval import load_splits
        from autoseg.device import best_device
        from autoseg.train import Trainer

        work = Workdir.of(self.workdir)
        t0 = time.time()
        fold = int(self.settings.get("fold", 0))
        steps = self.settings.get("trial_steps")
        seconds = float(self.settings["trial_s"])
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - t0)
        seconds = max(1.0, seconds - overhead(trial.study, seconds))  # the trial's time includes its scoring
        planned = int(steps or max(1, seconds / max(cfg.measured.step_time_s, 1e-6)))
        # at least 2: a timed run re-derives its total at each validation, always one step past it
        cfg = replace(cfg, schedule=replace(cfg.schedule, steps=planned, val_every=max(2, planned // RUNGS)))
        plans = replace(self.plans, configurations={**self.plans.configurations, cfg.name: cfg})
        run_dir = work.trial(trial.number)
        shutil.rmtree(run_dir.folder, ignore_errors=True)  # a number is never reused; a leftover is stale
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
            run = Trainer(work, cfg.name, fold, plans=plans, seconds=None if steps else seconds,
                          steps=int(steps) if steps else None, device=self.device, seed=self.seed,
                          workers=self.workers, progress=False, folder=run_dir.folder, on_validation=report).fit()
            val = load_splits(work, work.cached_cases(cfg.name), plans.folds)[fold]["val"]
            value = score_trial(run_dir, work, self.dataset, plans, cfg.name, fold, val, device)
            trial.set_user_attr("overhead_s", round(time.time() - t0 - run.seconds, 2))
            kept = True  # the final weights: the final training of this fold starts from the best trial's
            return value
        finally:
            for path in (run_dir.latest,) if kept else (run_dir.final, run_dir.latest):
                path.unlink(missing_ok=True)


def keep_best_weights(work: Workdir, study: optuna.Study, best: optuna.trial.FrozenTrial | None) -> str | None:
    """Delete the weights of every finished trial but the best's final ones, whose path (relative to the
    workdir) is returned when it has them. Running trials (another worker's) are left alone; a trial whose
    process died (:func:`~autoseg.search.study.fail_orphans`) may have left a periodic checkpoint."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        work.trial(t.number).latest.unlink(missing_ok=True)
        if best is None or t.number != best.number:
            work.trial(t.number).final.unlink(missing_ok=True)
    if best is None or not work.trial(best.number).final.is_file():
        return None
    return work.trial(best.number).final.relative_to(work.root).as_posix()


def overhead(study: optuna.Study, seconds: float) -> float:
    """Seconds a trial spends besides training (start-up, scoring): the median of the completed trials',
    else a guess of 15 %."""
    past = [t.user_attrs["overhead_s"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "overhead_s" in t.user_attrs]
    return float(np.median(past)) if past else OVERHEAD_GUESS * seconds


def min_left(study: optuna.Study, trial_s: float) -> Callable[[], float]:
    """Seconds a new trial needs: a share of a trial's training time, and its start-up and scoring."""
    return lambda: MIN_TRIAL_SHARE * trial_s + overhead(study, trial_s)


