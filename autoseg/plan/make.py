"""``make_plans``: a Fingerprint, a planner, a device and a budget in; Plans out."""

from __future__ import annotations

import os
import time

from autoseg.device import detect_device
from autoseg.plan import measurements
from autoseg.plan.budget import DEFAULT_BUDGET_S, format_duration, parse_duration
from autoseg.plan.registry import PlanningContext, get_planner
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans

BUSY_LOAD_PER_CPU = 1.5  # load average per CPU above which the step times measured are not the machine's own


def resolve_budget(budget: str | float | None, device_type: str) -> tuple[float, bool]:
    """Seconds of budget, and whether it is the device's default."""
    if budget is None:
        return DEFAULT_BUDGET_S[device_type], True
    return parse_duration(budget), False  # numbers too: a zero or negative budget is refused the same way


def make_plans(fingerprint: Fingerprint, planner: str = "default", budget: str | float | None = None,
               device: str | None = None, folds: int = 5, remeasure: bool = False) -> Plans:
    """Plan every configuration for ``fingerprint`` with the named planner (or a planner file), fitted to
    the measured speed and memory of ``device`` (default: the best available) and to ``budget`` (wall clock:
    '20m', '8h', or seconds; default: per device, see ``autoseg.plan.budget.DEFAULT_BUDGET_S``). Step times
    this machine measured before for the same setups are reused (:mod:`autoseg.plan.measurements`) unless
    ``remeasure``; those measured while the machine was busy are not kept.

    >>> plans = make_plans(Fingerprint.load("autoseg_work/MyData/fingerprint.json"), budget="20m")  # doctest: +SKIP
    """
    info = detect_device(device)
    seconds, is_default = resolve_budget(budget, info.type)
    ctx = PlanningContext(info, seconds, folds, planner)
    load_before = busy_load(info.type)
    t0 = time.perf_counter()
    with measurements.session(info, remeasure, keep=lambda: not (load_before or busy_load(info.type))) as store:
        plans = get_planner(planner)(fingerprint, ctx)
    plans.planning_time_s = round(time.perf_counter() - t0, 2)
    plans.measurements = {"reused": store.hits, "measured": store.misses}
    load = max(load_before, busy_load(info.type))
    if load:
        plans.notes.insert(0, f"busy machine: load average {load:.1f} on {os.cpu_count()} CPUs while measuring, so "
                              f"steps measured slower than they will be on a quiet machine and the plan is smaller; "
                              f"`autoseg plan --remeasure` when it is quiet")
    if is_default:
        plans.notes.insert(0, f"budget: default for {info.type}, {format_duration(seconds)} (set --budget)")
    return plans


def busy_load(device_type: str) -> float:
    """The 1-minute load average when other work competes for the CPU the planner measures on, else 0."""
    if device_type != "cpu" or not hasattr(os, "getloadavg"):
        return 0.0
    load = os.getloadavg()[0]
    return load if load > BUSY_LOAD_PER_CPU * (os.cpu_count() or 1) else 0.0
