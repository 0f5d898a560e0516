"""Several ``autoseg train`` processes on one work directory: which run a worker does next, and the locks
around preprocessing. Each (configuration, fold) run is claimed before it trains (:mod:`autoseg.claims`, under
``WORKDIR/claims/``), so the workers divide the runs between them and none is trained twice at once; a worker
with nothing left to claim waits for the runs others hold and takes over one whose worker died (at once on the
same machine, else after the claim's timeout). :mod:`autoseg.workflow` trains what :func:`next_run` hands it.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

from autoseg import claims
from autoseg.workdir import Workdir

logger = logging.getLogger(__name__)


@dataclass
class Pick:
    """The next run a worker does: its index among the pending ones, the ``claim`` just taken for it, or
    ``done``: finished already (read back, nothing to claim)."""

    index: int
    claim: claims.Claim | None = None
    taken_from: str = ""  # whose claim it took over, and why
    done: bool = False


def preprocess_locks(work: Workdir, configurations: list[str], stale_after_s: float = claims.DEFAULT_STALE_AFTER_S,
                     progress: bool = False) -> ExitStack:
    """The locks of ``configurations``' preprocessing, taken in name order (no two workers wait on each other),
    waiting while another worker preprocesses one; released when the returned stack closes."""
    stack = ExitStack()

    def say(holder: claims.Holder) -> None:
        if progress:
            logger.info(f"waiting: {holder.path.parent} is held by {holder.describe()}")

    try:
        for name in sorted(set(configurations)):
            stack.enter_context(claims.wait_claim(work.preprocess_lock(name), stale_after_s, on_wait=say))
    except BaseException:
        stack.close()
        raise
    return stack


def run_is_done(work: Workdir, configuration: str, fold: int) -> bool:
    """Trained and its held-out cases predicted and scored: nothing left for any worker to do."""
    run = work.run(configuration, fold)
    return run.final.is_file() and run.validation_summary.is_file()


def next_run(work: Workdir, pending: list[tuple[str, int, float]], stale_after_s: float, extend: bool,
             wait: bool = True, progress: bool = False, poll_s: float | None = None) -> Pick | None:
    """The next of ``pending`` this worker does, in order: a finished run (read, nothing to claim), else the
    first it can claim (free, released, or its worker dead or silent for longer than its claim's timeout).
    While every one left is held by a live worker, wait (``wait``) or return None."""
    poll = min(5.0, stale_after_s / claims.HEARTBEATS_PER_TIMEOUT) if poll_s is None else poll_s
    told = set()
    while True:
        for i, (c, k, _) in enumerate(pending):
            if not extend and run_is_done(work, c, k):
                return Pick(i, done=True)
            before = claims.holder(work.run_claim(c, k))
            claim = claims.try_claim(work.run_claim(c, k), stale_after_s)
            if claim is not None:
                state = before.state() if before is not None else "released"
                taken = f"taken over from {before.host} pid {before.pid} ({state})" \
                    if before is not None and state in ("dead", "stale") else ""
                if taken:
                    logger.warning(f"{c} fold {k}: {taken}")
                return Pick(i, claim, taken)
            if progress and (c, k) not in told:
                held = claims.holder(work.run_claim(c, k))
                if held is not None:
                    logger.info(f"{c} fold {k}: held by {held.describe()}")
                told.add((c, k))
        if not wait:
            return None
        time.sleep(poll)


