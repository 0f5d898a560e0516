"""``autoseg status [WORKDIR]``: the progress of a work directory that one or many workers share.

Per run (the planned ones, and any other a worker trained or claimed): which worker holds it (host, pid, and
whether it is alive, silent past its timeout or dead), steps done of planned, the last validation Dice of its
``log.csv``, and whether it is finished (trained and its held-out cases scored); then the search's trials, read
from its study (or ``search/trials.csv`` when the study cannot be opened here); then whether the bundle is
current. Read only: it takes no claim and never waits.

>>> print(status_text(workdir_status("autoseg_work/Dataset001_X")))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg import claims
from autoseg.errors import UserError
from autoseg.workdir import PLANS_FILE, Workdir


@dataclass
class RunStatus:
    configuration: str
    fold: int
    state: str  # finished, training, scoring, stale, dead, stopped, waiting
    steps: int
    planned: int | None  # None: not known before the run's first checkpoint (it trains past the plan's steps)
    dice: float | None = None  # the last validation's mean Dice (patches)
    worker: str = ""  # who holds it, or held it last


@dataclass
class WorkdirStatus:
    workdir: Path
    runs: list[RunStatus] = field(default_factory=list)
    trials: list[dict[str, Any]] | None = None
    trials_from: str = ""
    selection: list[str] | None = None
    bundle: str = ""  # "current", or why not


def find_workdir(workdir: Path | str | None) -> Workdir:
    """``workdir``; without one, the current folder when it holds plans.json, else the only workdir under
    ``./autoseg_work``."""
    if workdir is not None:
        work = Workdir(Path(workdir))
        if not work.plans_file.is_file():
            raise UserError(f"{work.plans_file}: not found; is {work.root} a work directory (`autoseg plan` makes one)?")
        return work
    if Path(PLANS_FILE).is_file():
        return Workdir(Path("."))
    found = sorted(p.parent for p in Path("autoseg_work").glob(f"*/{PLANS_FILE}"))
    if len(found) != 1:
        where = ", ".join(str(p) for p in found) if found else "none under ./autoseg_work"
        raise UserError(f"autoseg status: which work directory? ({where}); give it: autoseg status WORKDIR")
    return Workdir(found[0])


def workdir_status(workdir: Path | str | None = None, storage: str | None = None) -> WorkdirStatus:
    """What every run, the search and the bundle of ``workdir`` are at now."""
    from autoseg.workflow import select_runs

    work = find_workdir(workdir)
    plans = work.load_plans()
    planned = {(c, k) for c, k, _ in select_runs(plans, None, None)}
    seen = {(c, k) for c, k, _ in work.runs()} | set(work.claimed_runs())
    wanted = planned | seen
    for c in {c for c, k in seen - planned if c in plans.configurations}:  # workers train all its folds (--fold all)
        wanted |= {(c, k) for k in range(plans.folds)}
    now = time.time()
    status = WorkdirStatus(work.root)
    for c, k in sorted(wanted, key=lambda r: (list(plans.configurations).index(r[0])
                                              if r[0] in plans.configurations else len(plans.configurations), r)):
        planned = plans.configurations[c].schedule.steps if c in plans.configurations else 0
        status.runs.append(run_status(work, c, k, planned, now))
    status.trials, status.trials_from = _trials(work, plans.search, storage)
    selection = work.load_selection()
    status.selection = list(selection.ensemble) if selection is not None else None
    stale = work.bundle_staleness()
    status.bundle = "current" if stale is None else stale
    return status


def run_status(work: Workdir, configuration: str, fold: int, planned: int, now: float | None = None) -> RunStatus:
    from autoseg.checkpoint import read_progress
    from autoseg.trainlog import TrainLog

    now = time.time() if now is None else now
    run = work.run(configuration, fold)
    steps, total, done = 0, planned, False
    for path in (run.final, run.latest):
        if path.is_file():
            try:
                progress = read_progress(path)
                steps, total, done = progress["step"], progress["total_steps"], progress["finished"]
            except UserError:  # being replaced as we read: the log below still says how far it got
                continue
            break
    rows = TrainLog(run, {}).rows()
    if rows:
        steps = max(steps, int(rows[-1]["step"]))
    total = total if total >= steps else None  # trained past the plan's steps (--steps): known at its checkpoint
    dice = _float(rows[-1].get("val_dice_mean")) if rows else None
    held = claims.holder(work.run_claim(configuration, fold))
    holder_state = held.state(now) if held is not None else None
    worker = held.describe(now) if held is not None else ""
    scored = run.validation_summary.is_file()
    if done and scored:
        state = "finished"
    elif holder_state == "live":
        state = "scoring" if done else "training"
    elif holder_state in ("stale", "dead"):
        state = holder_state  # the next worker to look takes it over
    elif steps or done:
        state = "stopped"  # started, no worker on it now: `autoseg train` resumes it
    else:
        state = "waiting"
    return RunStatus(configuration, fold, state, steps, total, dice, worker)


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v else None


def _trials(work: Workdir, search: dict[str, Any], storage: str | None) -> tuple[list[dict] | None, str]:
    """The trial table from the study (live), else from ``search/trials.csv``; None without a search."""
    name = search.get("study")
    spec = storage if storage is not None else search.get("storage")
    if name and not (spec and "***" in spec):
        try:
            import optuna

            from autoseg.search.report import trial_rows
            from autoseg.search.study import open_storage

            study = optuna.load_study(study_name=name, storage=open_storage(spec, work.root))
            return trial_rows(study), f"study {name}"
        except Exception:  # unreachable, unknown study, missing driver: the table on disk says what it can
            pass
    if work.search_table.is_file():
        with open(work.search_table, newline="") as f:
            return list(csv.DictReader(f)), str(work.search_table)
    return None, ""


def status_text(st: WorkdirStatus) -> str:
    """The status as plain text, one line per run and per trial."""
    counts: dict[str, int] = {}
    for r in st.runs:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines = [f"{st.workdir}: {len(st.runs)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    if st.runs:
        width = max(len(f"{r.configuration} fold {r.fold}") for r in st.runs)
        lines.append(f"  {'run':<{width}}  {'state':<9} {'steps':>11}  {'val Dice':>8}  worker")
        for r in st.runs:
            dice = f"{r.dice:.3f}" if r.dice is not None else "-"
            steps = f"{r.steps}/{r.planned if r.planned is not None else '?'}"
            lines.append(f"  {f'{r.configuration} fold {r.fold}':<{width}}  {r.state:<9} "
                         f"{steps:>11}  {dice:>8}  {r.worker or '-'}")
    if st.trials is not None:
        lines.append(f"search ({st.trials_from}): {len(st.trials)} trial(s)")
        lines.append(f"  {'trial':>5}  {'state':<9} {'Dice':>6} {'steps':>6} {'seconds':>8}  what")
        for t in st.trials:
            dice = t.get("dice")
            dice = f"{float(dice):.4f}" if dice not in (None, "") else "-"
            what = " ".join(f"{k} {t[k]}" for k in ("family", "depth", "width", "patch", "loss", "lr", "batch")
                            if t.get(k) not in (None, ""))
            note = t.get("note") or ""
            rules = " (rules)" if str(t.get("rules")) == "True" else ""
            lines.append(f"  {t.get('trial'):>5}  {t.get('state'):<9} {dice:>6} {str(t.get('steps') or '-'):>6} "
                         f"{str(t.get('duration_s') or '-'):>8}  {what}{rules}{'; ' + note if note else ''}")
    if st.selection is not None:
        lines.append(f"selection: {' + '.join(st.selection)}")
    bundle = Workdir(st.workdir).bundle_file
    lines.append(f"bundle: {bundle} is current (newer than every finished run and the selection)"
                 if st.bundle == "current" else f"bundle: not current ({st.bundle})")
    return "\n".join(lines)
