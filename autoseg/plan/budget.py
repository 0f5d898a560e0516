"""The wall-clock budget: parsing it, dividing it into training runs, and turning seconds into steps."""

from __future__ import annotations

import math
import re

from autoseg.errors import UserError

DEFAULT_BUDGET_S = {"cpu": 3600.0, "mps": 2 * 3600.0, "cuda": 8 * 3600.0}
RESERVE_FRACTION = 0.1  # validation, out-of-fold prediction and bundling come out of the same budget
RESERVE_FIXED_S = 20.0
FOLDS_MIN_RUN_S = 30 * 60  # train all folds only when each run still gets half an hour
ALL_CONFIGS_MIN_BUDGET_S = 2 * 3600  # below this, only the primary configuration trains by default
MIN_STEPS = 800  # every run plans at least this many steps (see target_steps)
CHECKPOINT_SHARE = 0.05  # a kill loses at most this share of a run (see checkpoint_interval)
CHECKPOINT_MIN_S, CHECKPOINT_MAX_S = 5.0, 300.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str = "budget") -> float:
    """'90s', '20m', '1.5h', '1h30m', '2d' or a plain number of seconds (``what`` names it in errors)."""
    t = str(text).strip().lower()
    try:
        seconds = float(t)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
        if not parts or "".join(f"{a}{b}" for a, b in parts) != t.replace(" ", ""):
            raise UserError(f"{what} '{text}': expected a duration like 90s, 20m, 1.5h or 1h30m") from None
        seconds = sum(float(a) * _UNITS[b] for a, b in parts)
    if not math.isfinite(seconds) or seconds <= 0:  # '-5', '0', 'nan' and 'inf' parse as floats too
        raise UserError(f"{what} '{text}': must be a positive, finite duration")
    return seconds


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def allocate_runs(primary: str, others: list[str], folds: int, budget_s: float) -> list[dict]:
    """Which (configuration, fold) runs the default ``autoseg train`` does, and the seconds of each.

    Small budgets buy one well-trained model rather than several half-trained ones: all folds only when
    each run keeps ``FOLDS_MIN_RUN_S``; secondary configurations only above ``ALL_CONFIGS_MIN_BUDGET_S``.
    """
    train_s = max(budget_s * (1 - RESERVE_FRACTION) - RESERVE_FIXED_S, budget_s * 0.5)
    configs = [primary] + (others if budget_s >= ALL_CONFIGS_MIN_BUDGET_S else [])
    n_folds = folds if train_s / (len(configs) * folds) >= FOLDS_MIN_RUN_S else 1
    per_run = train_s / (len(configs) * n_folds)
    return [{"configuration": c, "fold": f, "seconds": round(per_run, 1)} for c in configs for f in range(n_folds)]


def target_steps(run_s: float) -> int:
    """How many steps a run should at least get: ``MIN_STEPS``, and from about 47 minutes on more for longer
    runs, sub-linearly (15 per square-root second, at most 20000), so that long budgets buy both a bigger model
    and more steps; below that, more time buys a bigger model or patch. The floor is for small classes, which a
    poly schedule learns late (the synthetic tasks' small classes stay at Dice 0 for their first few hundred
    steps): a run shorter than that misses them whatever its width (benchmarks/results/accuracy.md)."""
    return int(min(max(15 * math.sqrt(run_s), MIN_STEPS), 20000))


def checkpoint_interval(run_s: float) -> float:
    """Seconds between a run's periodic checkpoints: ``CHECKPOINT_SHARE`` of the run, so that a kill loses at
    most that share whatever the budget (a 4-minute run: 12 s; 15 minutes: 45 s), at least ``CHECKPOINT_MIN_S``
    and at most ``CHECKPOINT_MAX_S`` (an 8-hour run loses 5 minutes, not 24). The trainer stretches it when
    writing one checkpoint costs more than 1 % of it (timed as it writes: a large network on a slow shared
    disk), so checkpointing stays under 1 % of the run."""
    return round(min(max(CHECKPOINT_SHARE * run_s, CHECKPOINT_MIN_S), CHECKPOINT_MAX_S), 1)
