"""The Optuna study behind ``autoseg plan --search``: storage, settings shared by every worker, and the
loop that runs trials until the study has its trials or the search budget is spent.

Storage is SQLite in the workdir by default (``WORKDIR/search.db``), so running the same command again
resumes the same study; a database URL (PostgreSQL, MySQL) or a journal file (``*.journal`` / ``*.log``)
on a shared disk lets workers on several machines share it. The study's settings (space, fidelity, trial
count, deadline) live in the study itself, so a worker needs nothing but the storage and the workdir.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autoseg.claims import alive, process_started
from autoseg.errors import UserError
from autoseg.workdir import Workdir

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3
PRUNE_REDUCTION = 2  # successive halving: half of the trials that reach a rung go on


def default_storage(workdir: Path) -> str:
    return f"sqlite:///{Workdir.of(workdir).study_db.resolve()}"


def open_storage(spec: str | None, workdir: Path) -> optuna.storages.BaseStorage:
    """``None``: SQLite in the workdir; a path ending in .journal or .log: a journal file (shared disks,
    several machines); otherwise a database URL (sqlite:///, postgresql://, mysql://)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec is None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        spec = default_storage(workdir)
    if spec.endswith((".journal", ".log")) and "://" not in spec:
        path = Path(spec).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"--storage {spec}: folder {path.parent} does not exist")
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in spec:
        raise UserError(f"--storage {spec}: expected a database URL (sqlite:///FILE, postgresql://..., "
                        "mysql://...) or a journal file ending in .journal or .log")
    try:
        return optuna.storages.RDBStorage(with_driver(spec), engine_kwargs={"connect_args": {"timeout": 60}}
                                          if spec.startswith("sqlite") else None)
    except Exception as e:  # bad URL, missing driver, unreachable server: the user's to fix
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if spec.startswith("postgresql") and "import" in reason:
            reason += "; pip install 'autoseg[postgres]'"
        raise UserError(f"--storage {redact(spec)}: cannot open the study storage ({reason})") from None


def with_driver(url: str) -> str:
    """A ``postgresql://`` URL names no driver, and SQLAlchemy's default differs by version (psycopg2 before 2.1,
    psycopg 3 from 2.1): name the one installed (``autoseg[postgres]`` installs psycopg 3)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    import sqlalchemy

    rest = url[len("postgresql://"):]
    if importlib.util.find_spec("psycopg") is not None and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        return f"postgresql+psycopg://{rest}"
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def redact(url: str) -> str:
    """A URL without its password, for files and messages."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def make_study(storage, name: str, seed: int, n_trials: int) -> optuna.Study:
    """Create or load the study: TPE (seeded; random for the first third of the trials, at least 3) and a
    successive-halving pruner over validation rungs."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, n_trials // 3))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=PRUNE_REDUCTION)
    return optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def load_study(storage, name: str, seed: int) -> optuna.Study:
    n = int(optuna.load_study(study_name=name, storage=storage).user_attrs.get("trials", 12))
    return make_study(storage, name, seed, n)


def enqueue_rules(study: optuna.Study, params: dict[str, Any]) -> None:
    """The rules' point is the first trial, once; again only when it never finished (interrupted)."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("rules") and t.state in (*FINISHED, TrialState.WAITING, TrialState.RUNNING):
            return
    study.enqueue_trial(params, user_attrs={"rules": True})


def enqueue_neighbours(study: optuna.Study, moves: list[tuple[str, dict[str, Any]]]) -> None:
    """Single changes to the rules' point (label, parameters) run next, once: a resumed study (or one a
    worker joined) does not queue them again."""
    if any("neighbour" in t.user_attrs for t in study.get_trials(deepcopy=False)):
        return
    for label, params in moves:
        study.enqueue_trial(params, user_attrs={"neighbour": label})


def claim(trial: optuna.Trial) -> None:
    """Record which process runs ``trial`` (host, pid and the pid's start time), so that a later run can tell
    a trial whose process died (killed, crashed) from one another process is still running."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_started", process_started(os.getpid()))


def fail_orphans(study: optuna.Study) -> list[int]:
    """Mark trials this machine left RUNNING in a process that no longer exists (killed, crashed) as failed,
    saying which; returns their numbers. The same command then resumes the study from there."""
    host, orphans = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or alive(int(pid), t.user_attrs.get("pid_started")):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "orphaned", True)  # its time is capped in spent_seconds
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        orphans.append(t.number)
        label = " (rules)" if t.user_attrs.get("rules") else f" ({t.user_attrs['neighbour']})" \
            if "neighbour" in t.user_attrs else ""
        logger.warning(f"search: trial {t.number}{label} was left running by process {pid} on {host}, which has "
                       f"ended (killed or crashed: see that run's output); marked failed, the search goes on")
    return orphans


def spent_seconds(study: optuna.Study) -> float:
    """Wall time of the finished and failed trials (what the search budget has paid for so far)."""
    total, most = 0.0, study.user_attrs.get("trial_s")
    for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.FAIL)):
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            if t.user_attrs.get("orphaned") and most:  # failed when found, maybe hours after its process died
                seconds = min(seconds, float(most))
            total += seconds
    return total


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: finished, and running ones (another worker's included)."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
               deadline: float | None, min_trial_s: float | Callable[[], float] = 0.0,
               on_done: Callable[[optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Ask and tell until the study has ``n_trials`` or less than ``min_trial_s`` (seconds, or a function
    giving them) is left before ``deadline`` (Unix time). A failing trial is recorded as failed and the search goes on; an interrupt fails the
    running trial and ends the loop. Returns the number of trials this call ran."""
    with _native_crashes_traced():
        return _run_trials(study, objective, n_trials, deadline, min_trial_s, on_done)


@contextmanager
def _native_crashes_traced() -> Iterator[None]:
    """Python's stacks on stderr if the process dies of a native fault (heap corruption, a segfault) while trials
    run: without them such a crash says nothing of where it happened, and the next run's :func:`fail_orphans`
    can only say which trial was running."""
    if faulthandler.is_enabled():
        yield
        return
    try:
        faulthandler.enable()
    except (ValueError, OSError, AttributeError):  # stderr is not a file (captured, closed)
        yield
        return
    try:
        yield
    finally:
        faulthandler.disable()


def _run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
                deadline: float | None, min_trial_s: float | Callable[[], float],
                on_done: Callable[[optuna.trial.FrozenTrial], None] | None) -> int:
    ran, failures = 0, 0
    while counted(study) < n_trials:
        if deadline is not None and deadline - time.time() < (min_trial_s() if callable(min_trial_s) else min_trial_s):
            break
        trial = study.ask()
        claim(trial)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            frozen, failures = study.tell(trial, state=TrialState.PRUNED), 0
        except BaseException as e:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            failures += 1
            # an interrupt ends the loop (the same command resumes); so does the same error three times over
            if not isinstance(e, Exception) or failures >= MAX_FAILURES_IN_A_ROW:
                raise
            logger.warning(f"search: trial {trial.number} failed ({type(e).__name__}: {e})")
            frozen = study.trials[trial.number]
        else:
            frozen, failures = study.tell(trial, value), 0
        ran += 1
        if on_done is not None:
            on_done(frozen)
    return ran
