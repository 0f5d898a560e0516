"""Stages chained as the CLI runs them: ``plan_dataset`` = validate -> fingerprint -> plan -> preprocess;
``train_dataset`` = train the planned runs -> out-of-fold validation -> select -> bundle.

Any number of ``autoseg train`` processes may share one workdir (one machine, or several on a shared disk): they
divide the runs through claims (:mod:`autoseg.workers`), and preprocessing a configuration and the selection +
bundle step are locks; the selection runs when every run a worker was asked for is finished, once: a worker that
finds the bundle current (:meth:`~autoseg.workdir.Workdir.bundle_staleness`) leaves it.

These return what they did (the CLI and the demo print it); long work reports progress through ``logging``.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from autoseg import claims
from autoseg.distributed import is_main_process, world_size
from autoseg.errors import DatasetError, UserError
from autoseg.fingerprint import extract_fingerprint
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans
from autoseg.schema.selection import Selection
from autoseg.workdir import Workdir
from autoseg.workers import Pick, next_run, preprocess_locks

logger = logging.getLogger(__name__)


@dataclass
class PlanResult:
    workdir: Path
    fingerprint: Fingerprint
    plans: Plans
    replanned: bool
    preprocessed: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _same_request(plans: Plans, fp: Fingerprint, planner: str, budget_s: float | None, device: str | None) -> bool:
    """Keep an existing plans.json (possibly edited by the user) when nothing it was made from changed."""
    return (plans.fingerprint_hash == fp.dataset_hash and plans.planner == planner
            and (budget_s is None or abs(plans.budget_s - budget_s) < 1e-6)
            and (device is None or plans.device.get("type") == device.split(":")[0]))


def plan_dataset(dataset: Path | str, workdir: Path | str | None = None, planner: str = "default",
                 budget: str | float | None = None, device: str | None = None, jobs: int | None = None,
                 replan: bool = False, progress: bool = False, folds: int | None = None,
                 preprocess_also: list[str] | None = None, remeasure: bool = False,
                 measurements_dir: Path | None = None, init: Path | str | None = None) -> PlanResult:
    """Validate, fingerprint, plan and preprocess ``dataset`` into ``workdir``.

    An existing ``plans.json`` made from the same dataset, planner, budget and device is kept as it is
    (so a user's edits survive a re-run); ``replan=True`` makes a new one. ``folds`` defaults to the existing
    plan's, else 5. ``remeasure`` times the candidate networks again instead of reusing this machine's
    earlier measurements (and so re-plans); those are kept in ``measurements_dir`` (None: none kept). Only the
    configurations the default ``autoseg train`` trains are
    preprocessed, plus ``preprocess_also`` (names, or ``["all"]``); ``autoseg train --config NAME``
    preprocesses the others. ``init`` (a bundle) plans fine-tuning its networks instead (:mod:`autoseg.finetune`):
    the dataset must have the bundle's channels and classes.
    """
    import time

    from autoseg import parallel

    started = jobs is None or jobs > 1
    if started:  # first: the worker server loads preprocessing (torch) while we import it
        parallel.start(["autoseg.preprocess"])

    from autoseg.plan.budget import parse_duration
    from autoseg.plan.make import get_planner, make_plans
    from autoseg.preprocess import preprocess
    from autoseg.validate import validate_dataset

    wd = Workdir.for_dataset(dataset, workdir)
    work = wd.root
    # arguments first: a typo in --budget or --planner should not wait for the dataset to be read
    budget_s = None if budget is None else parse_duration(budget)
    get_planner(planner)
    bundle = sha = None
    if init is not None:  # before the dataset is read: a bundle that cannot fine-tune on it is refused at once
        from autoseg import finetune
        from autoseg.bundle import load_bundle
        from autoseg.dataset import load_dataset

        bundle = load_bundle(init)
        finetune.check_compatible(load_dataset(dataset), bundle.plans, str(init))
        sha = finetune.sha256_file(init)
    timings = {}
    t = time.perf_counter()
    problems = validate_dataset(dataset, jobs=jobs, progress=progress)
    if problems:
        raise DatasetError(problems)
    timings["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    fp = extract_fingerprint(dataset, jobs=jobs, progress=progress)
    wd.save_fingerprint(fp)
    timings["fingerprint"] = time.perf_counter() - t

    t = time.perf_counter()
    plans, replanned = None, True
    if wd.plans_file.is_file() and not (replan or remeasure):
        existing = wd.load_plans()
        same = (_same_finetune(existing, fp, sha, budget_s, device) if bundle is not None
                else _same_request(existing, fp, planner, budget_s, device))
        if same and folds in (None, existing.folds):
            plans, replanned = existing, False
    if plans is None and bundle is not None:
        if _holds_other_runs(wd, sha):
            raise UserError(f"{wd.root}: holds training runs of another plan; fine-tune {init} into another "
                            f"--workdir (or delete {wd.runs_dir})")
        plans = finetune.finetune_plans(bundle, sha, fp, budget_s, device, folds or 5, measurements_dir, remeasure)
        wd.save_plans(plans)
    if bundle is not None:
        finetune.write_init_weights(wd, bundle, plans)
    if plans is None:
        if progress:
            logger.info("planning: measuring candidate networks on the device ...")
        if started:
            parallel.wait_started()  # measure step times on an otherwise idle CPU
        plans = make_plans(fp, planner, budget_s, device, folds or 5, remeasure=remeasure,
                           measurements_dir=measurements_dir)
        wd.save_plans(plans)
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    names = trained_configurations(plans)
    extra = list(plans.configurations) if preprocess_also == ["all"] else (preprocess_also or [])
    names += [n for n in extra if n not in names]
    with preprocess_locks(wd, names, progress=progress):
        done = preprocess(dataset, work, plans, fp, configurations=names, jobs=jobs, progress=progress)
    timings["preprocess"] = time.perf_counter() - t
    return PlanResult(work, fp, plans, replanned, done, timings)


def _same_finetune(plans: Plans, fp: Fingerprint, sha256: str, budget_s: float | None, device: str | None) -> bool:
    """Keep an existing fine-tuning plan of the same bundle, dataset, budget and device (a resumed run)."""
    from autoseg.finetune import same_source

    return (same_source(plans, sha256) and plans.fingerprint_hash == fp.dataset_hash
            and (budget_s is None or abs(plans.budget_s - budget_s) < 1e-6)
            and (device is None or plans.device.get("type") == device.split(":")[0]))


def _holds_other_runs(wd: Workdir, sha256: str) -> bool:
    """Whether the workdir has training runs of a plan that is not a fine-tuning of this bundle (which a
    fine-tuning plan would otherwise take over as its own)."""
    from autoseg.finetune import same_source

    if not wd.runs():
        return False
    try:
        return not same_source(wd.load_plans(), sha256)
    except UserError:
        return True


def trained_configurations(plans: Plans) -> list[str]:
    """The configurations the default ``autoseg train`` trains: the ones ``autoseg plan`` preprocesses. The
    others are preprocessed by the first ``autoseg train --config NAME`` that asks for them."""
    return list(dict.fromkeys(r["configuration"] for r in plans.train_runs)) or list(plans.configurations)


def ensure_preprocessed(dataset: Path | str, work: Workdir | Path | str, plans: Plans, configurations: list[str],
                        jobs: int | None = None, progress: bool = False,
                        stale_after_s: float = claims.DEFAULT_STALE_AFTER_S) -> dict[str, int]:
    """Bring the cache of ``configurations`` up to date (a no-op for cases already current), one worker at a
    time per configuration."""
    from autoseg.preprocess import preprocess

    work = Workdir.of(work)
    missing = [c for c in configurations if not work.is_preprocessed(c)]
    one_process = is_main_process() and world_size() == 1
    if not missing and (not work.fingerprint_file.is_file() or not one_process):
        return {}  # under torchrun every rank would preprocess into one folder: rank 0 alone did, at plan time
    if missing and not one_process:
        raise UserError(f"configuration {', '.join(missing)} is not preprocessed yet: run `autoseg plan "
                        f"{dataset} --preprocess {' '.join(missing)}` first, then torchrun again")
    if not work.fingerprint_file.is_file():
        raise UserError(f"{work.fingerprint_file}: missing; run `autoseg plan {dataset}` first")
    with preprocess_locks(work, configurations, stale_after_s, progress):
        return preprocess(dataset, work, plans, work.load_fingerprint(), configurations=configurations, jobs=jobs,
                          progress=progress)


def summary(result: PlanResult) -> str:
    """A readable table of what was planned, for the terminal."""
    from autoseg.plan.budget import format_duration

    p = result.plans
    lines = [f"plans for {p.dataset_name} on {p.device.get('type')} ({p.device.get('name')}), "
             f"budget {format_duration(p.budget_s)}"
             + ("" if result.replanned else "  [kept existing plans.json; --replan to redo]")]
    if p.axis_order and p.axis_order != sorted(p.axis_order):
        lines.append(f"axis order {p.axis_order} (coarsest axis first)")
    for name, c in p.configurations.items():
        m = c.measured
        lines.append(f"  {name:<11} spacing {_fmt(c.spacing)}  patch {'x'.join(map(str, c.patch_size))}  "
                     f"batch {c.batch_size}  {c.network.family} {m.parameters / 1e6:.2f}M params "
                     f"(width {c.network.features[0]}, {c.network.n_stages} stages)")
        lines.append(f"  {'':<11} {c.precision}{' channels-last' if c.channels_last else ''}: "
                     f"{m.step_time_s:.3f} s/step{' (predicted)' if m.extrapolated else ''}, "
                     f"{m.peak_memory_mb:.0f} MiB, {c.schedule.steps} steps = "
                     f"{format_duration(c.schedule.steps * m.step_time_s)} per run")
    runs = p.train_runs
    if runs:
        configs = sorted({r["configuration"] for r in runs}, key=[r["configuration"] for r in runs].index)
        folds = sorted({r["fold"] for r in runs})
        lines.append(f"training: {len(runs)} run(s) ({', '.join(configs)}; folds {folds}) of "
                     f"{format_duration(runs[0]['seconds'])} each")
    for n in p.notes:
        if n.startswith(("budget", "busy machine")) or p.finetune:
            lines.append(n)
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    reused = p.measurements.get("reused", 0) if result.replanned else 0
    if reused:
        lines.append(f"planning reused {reused} step measurement(s) this machine made before for the same setups "
                     f"(--remeasure times them again)")
    pre = ", ".join(f"{k} {v}" for k, v in result.preprocessed.items())
    lines.append(f"preprocessed (cases computed): {pre}")
    later = [n for n in p.configurations if n not in result.preprocessed]
    if later:
        lines.append(f"not preprocessed yet (not trained in this budget): {', '.join(later)}; "
                     f"`autoseg train --config {later[0]}` preprocesses it first")
    lines.append(f"wrote {Workdir(result.workdir).plans_file}")
    return "\n".join(lines)


def _fmt(v: list[float]) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


@dataclass
class TrainedRun:
    configuration: str
    fold: int
    seconds: float
    finished: bool
    steps: int
    oof: dict | None = None
    note: str = ""  # another worker's part in it: trained it, took it over, or this worker took it over


@dataclass
class TrainResult:
    """What ``train_dataset`` did: the runs, then the selection and the bundle made from them (or why not)."""

    runs: list[TrainedRun] = field(default_factory=list)
    selection: Selection | None = None
    selection_error: str | None = None
    bundle: Path | None = None
    bundle_error: str | None = None
    workdir: Path | None = None
    selection_note: str | None = None  # why this worker did not select (another does, or already current)


def select_runs(plans: Plans, configuration: str | None, fold: str | int | None) -> list[tuple[str, int, float]]:
    """(configuration, fold, seconds) to train: the plan's runs by default; ``fold='all'`` means every fold."""
    from autoseg.errors import UserError

    planned = plans.train_runs or [{"configuration": next(iter(plans.configurations)), "fold": 0,
                                    "seconds": plans.budget_s}]
    default_s = planned[0]["seconds"]
    if configuration is not None and configuration not in plans.configurations:
        raise UserError(f"--config {configuration}: plans.json has {', '.join(plans.configurations)}")
    configs = [configuration] if configuration else list(dict.fromkeys(r["configuration"] for r in planned))
    seconds = {(r["configuration"], r["fold"]): r["seconds"] for r in planned}
    if fold is None:
        runs = [(r["configuration"], r["fold"]) for r in planned if r["configuration"] in configs]
        if not runs:
            runs = [(c, 0) for c in configs]
    elif str(fold) == "all":
        runs = [(c, k) for c in configs for k in range(plans.folds)]
    else:
        runs = [(c, int(fold)) for c in configs]
    return [(c, k, seconds.get((c, k), default_s)) for c, k in runs]


def train_dataset(dataset: Path | str, workdir: Path | str | None = None, configuration: str | None = None,
                  fold: str | int | None = None, budget: str | float | None = None, device: str | None = None,
                  extend: str | float | None = None, seed: int = 0, workers: int | None = None,
                  progress: bool = True, splits_file: Path | str | None = None,
                  steps: int | None = None, checkpoint_every_s: float | None = None,
                  claim_timeout_s: float = claims.DEFAULT_STALE_AFTER_S, min_dice: float | None = None) -> TrainResult:
    """Train the planned runs (or the ones asked for) inside the budget, predict and score each finished
    fold's held-out cases, then select the model and pack the bundle. ``budget`` overrides the plan's and is
    split evenly over the runs (the checkpoint interval re-derived from it); ``steps`` fixes each run's length
    instead (no adaptation to the measured speed: repeatable); ``checkpoint_every_s`` overrides the plan's
    checkpoint interval. Other workers may share the workdir (see the module's docstring); a claim this worker
    takes counts as abandoned after ``claim_timeout_s`` without a heartbeat. ``min_dice``: the Dice the quality
    flag warns of (:mod:`autoseg.quality`; default the out-of-fold median minus a margin)."""
    from autoseg.distributed import DistContext
    from autoseg.plan.budget import checkpoint_interval, format_duration, parse_duration

    work = Workdir.for_dataset(dataset, workdir)
    plans = work.load_plans()
    runs = select_runs(plans, configuration, fold)
    if not (claim_timeout_s > 0):
        raise UserError(f"claim timeout {claim_timeout_s!r}: expected a positive number of seconds")
    ensure_preprocessed(dataset, work, plans, list(dict.fromkeys(c for c, _, _ in runs)), progress=progress,
                        stale_after_s=claim_timeout_s)
    every = {}
    if budget is not None:
        total = float(budget) if isinstance(budget, (int, float)) else parse_duration(budget)
        runs = [(c, k, total / len(runs)) for c, k, _ in runs]
        every = {(c, k): checkpoint_interval(s) for c, k, s in runs}
    extend_s = None if extend is None else (float(extend) if isinstance(extend, (int, float)) else parse_duration(extend))
    main = is_main_process()
    if main:
        logger.info(f"training {len(runs)} run(s): "
                    + ", ".join(f"{c} fold {k} ({format_duration(s)})" for c, k, s in runs))
    # under torchrun rank 0 claims and the others follow (one decision, broadcast)
    dist = DistContext.start(device) if world_size() > 1 else None
    result = TrainResult(workdir=work.root)
    pending = list(runs)
    while pending:
        pick = None
        if main:
            pick = next_run(work, pending, claim_timeout_s, extend_s is not None, wait=dist is None,
                            progress=progress)
        if dist is not None:
            code = dist.broadcast_int(-1 if pick is None else 2 * pick.index + (not pick.done))
            pick = pick if main else (None if code < 0 else Pick(code // 2, done=code % 2 == 0))
        if pick is None:  # the rest are held by live workers (torchrun does not wait for them)
            result.runs += [TrainedRun(c, k, 0.0, False, 0, note="held by another worker") for c, k, _ in pending]
            break
        c, k, s = pending.pop(pick.index)
        run = _train_one(work, dataset, plans, c, k, s, pick, device=device, steps=steps, seed=seed,
                         workers=workers, progress=progress, extend_s=extend_s, splits_file=splits_file,
                         checkpoint_every_s=checkpoint_every_s if checkpoint_every_s is not None
                         else every.get((c, k)))
        result.runs.append(run)
    if main and all(r.finished for r in result.runs):
        _select_and_bundle(work, dataset, result, claim_timeout_s, progress, min_dice)
    elif main:
        result.selection_note = "not every run is finished: the worker that finishes the last one selects"
    return result


def _train_one(work: Workdir, dataset: Path | str, plans: Plans, c: str, k: int, seconds: float, pick: Pick, *,
               device, steps, seed, workers, progress, extend_s, splits_file, checkpoint_every_s) -> TrainedRun:
    """One run under its claim (held, with a heartbeat, until its held-out cases are scored), or a finished
    one read back."""
    from autoseg.checkpoint import read_progress
    from autoseg.crossval import load_splits
    from autoseg.device import best_device
    from autoseg.finetune import fixed_steps
    from autoseg.oof import predict_fold_validation
    from autoseg.train import Trainer

    main = is_main_process()
    if pick.done:  # trained and scored (by another worker, or before): read back, nothing built
        done = read_progress(work.run(c, k).final)
        return TrainedRun(c, k, done["elapsed_s"], True, done["step"], note="already finished",
                          oof=work.run(c, k).read_validation_summary() if main else None)
    with ExitStack() as stack:
        if pick.claim is not None:
            stack.enter_context(pick.claim)
        trainer = Trainer(work, c, k, plans=plans, seconds=seconds,
                          steps=steps if steps is not None else fixed_steps(plans, c), device=device, seed=seed,
                          workers=workers, progress=progress, extend_s=extend_s, splits_file=splits_file,
                          checkpoint_every_s=checkpoint_every_s, claim=pick.claim,
                          init_weights=warm_start(work, plans, c, k, splits_file))
        try:
            r = trainer.fit()
        except claims.ClaimLost as e:
            logger.warning(str(e))
            return TrainedRun(c, k, 0.0, False, 0, note="taken over by another worker")
        run = TrainedRun(c, k, r.seconds, r.finished, r.steps, note=pick.taken_from)
        if r.finished and main:
            summary = work.run(c, k).read_validation_summary()
            if summary is None or extend_s:
                val = load_splits(work, work.cached_cases(c), plans.folds, splits_file)[k]["val"]
                # where the run trained: a GPU run's held-out cases are predicted on it
                try:
                    summary = predict_fold_validation(work, dataset, plans, c, k, val,
                                                      device=device or best_device(), progress=progress,
                                                      before_write=pick.claim.verify if pick.claim else None)
                except claims.ClaimLost as e:
                    logger.warning(str(e))
                    return TrainedRun(c, k, 0.0, False, 0, note="taken over by another worker")
            run.oof = summary
        return run


def _select_and_bundle(work: Workdir, dataset: Path | str, result: TrainResult, stale_after_s: float,
                       progress: bool, min_dice: float | None = None) -> None:
    """Select and pack under the selection lock, unless the bundle is already newer than every finished run
    and the selection (another worker made it)."""
    from autoseg.bundle import pack_bundle

    def say(holder: claims.Holder) -> None:
        if progress:
            logger.info(f"waiting: the selection is being made by {holder.describe()}")

    with claims.wait_claim(work.select_lock, stale_after_s, on_wait=say):
        stale = work.bundle_staleness()
        if stale is None:
            result.selection_note = f"{work.bundle_file} is current (newer than every finished run and the selection)"
            return
        result.selection, result.selection_error = select_after_training(work, dataset, min_dice)
        try:
            result.bundle = pack_bundle(work)  # -> the file to share
        except UserError as e:  # reported, not raised: the trained runs stand
            result.bundle_error = str(e)


def select_after_training(work: Workdir | Path | str, dataset: Path | str, min_dice: float | None = None
                          ) -> tuple[Selection | None, str | None]:
    """Configuration, ensemble and post-processing from the out-of-fold outputs, as ``train`` ends; a selection
    that cannot be made (e.g. the references moved) is reported, not raised: the trained runs stand and
    ``autoseg select`` redoes it."""
    from autoseg.select import select_model

    try:
        return select_model(work, dataset, min_dice=min_dice), None
    except UserError as e:
        return None, str(e)


def warm_start(work: Workdir | Path | str, plans: Plans, configuration: str, fold: int,
               splits_file: Path | str | None = None) -> Path | None:
    """The search's best trial's weights when this run is the one it trained (same configuration, fold and
    split): the final training continues from them instead of starting over. A fine-tuning plan's run starts
    from its bundle network's weights (:mod:`autoseg.finetune`)."""
    from autoseg.finetune import init_weights_for

    work = Workdir.of(work)
    if (path := init_weights_for(work, plans, configuration, fold)) is not None:
        return path
    ws = plans.search.get("warm_start") or {}
    if splits_file is not None or ws.get("configuration") != configuration or ws.get("fold") != fold:
        return None
    path = work.root / ws["checkpoint"]
    return path if path.is_file() else None


def train_summary(result: TrainResult) -> str:
    """What training did, for the terminal: one line per run, then the selection and the bundle."""
    from autoseg.select import selection_table

    lines = []
    for r in result.runs:
        status = "finished" if r.finished else "stopped"
        line = f"{r.configuration} fold {r.fold}: {status} after {r.steps} steps ({r.seconds:.0f}s)"
        if r.note and not r.steps:
            line = f"{r.configuration} fold {r.fold}: {r.note}"
        elif r.note:
            line += f" ({r.note})"
        if r.oof:
            dice = ", ".join(f"{k} {v:.3f}" for k, v in r.oof["mean_dice"].items() if v is not None)
            line += f"; held-out Dice: {dice}"
        lines.append(line)
    if result.selection is not None:
        lines += [selection_table(result.selection), f"wrote {Workdir(result.workdir).selection_file}"]
    if result.selection_error:
        lines.append(f"model selection skipped: {result.selection_error}")
    if result.selection_note:
        lines.append(f"model selection left: {result.selection_note}")
    if result.bundle is not None:
        lines.append(f"wrote {result.bundle} (`autoseg predict {result.bundle} INPUT OUTPUT` works anywhere "
                     "autoseg is installed)")
    if result.bundle_error:
        lines.append(f"bundle not written: {result.bundle_error}")
    return "\n".join(lines)
