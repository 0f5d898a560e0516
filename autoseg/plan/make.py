"""``make_plans``: a Fingerprint, a planner, a device and a budget in; Plans out."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from autoseg.device import detect_device
from autoseg.errors import UserError
from autoseg.plan import measurements
from autoseg.plan.budget import DEFAULT_BUDGET_S, format_duration, parse_duration
from autoseg.plan.registry import PLANNERS, Planner, PlanningContext
from autoseg.planners import default as _default  # noqa: F401  (registers the built-in planners)
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans

BUSY_LOAD_PER_CPU = 1.5  # load average per CPU above which the step times measured are not the machine's own


def resolve_budget(budget: str | float | None, device_type: str) -> tuple[float, bool]:
    """Seconds of budget, and whether it is the device's default."""
    if budget is None:
        return DEFAULT_BUDGET_S[device_type], True
    return parse_duration(budget), False  # numbers too: a zero or negative budget is refused the same way


def make_plans(fingerprint: Fingerprint, planner: str = "default", budget: str | float | None = None,
               device: str | None = None, folds: int = 5, remeasure: bool = False,
               measurements_dir: Path | None = None) -> Plans:
    """Plan every configuration for ``fingerprint`` with the named planner (or a planner file), fitted to
    the measured speed and memory of ``device`` (default: the best available) and to ``budget`` (wall clock:
    '20m', '8h', or seconds; default: per device, see ``autoseg.plan.budget.DEFAULT_BUDGET_S``). Step times
    this machine measured before for the same setups, kept in ``measurements_dir`` (None: none kept), are
    reused (:mod:`autoseg.plan.measurements`) unless ``remeasure``; those measured while the machine was
    busy are not kept.

    >>> plans = make_plans(Fingerprint.load("autoseg_work/MyData/fingerprint.json"), budget="20m")  # doctest: +SKIP
    """
    info = detect_device(device)
    seconds, is_default = resolve_budget(budget, info.type)
    store = measurements.Store(info, measurements_dir, remeasure)
    ctx = PlanningContext(info, seconds, folds, planner, store)
    probed = measurements.OthersCpu(info.type).on  # each measurement checked on its own (Linux)
    load_before = 0.0 if probed else busy_load(info.type)
    t0 = time.perf_counter()
    try:
        plans = get_planner(planner)(fingerprint, ctx)
    finally:
        if probed or not (load_before or busy_load(info.type)):  # a busy machine's step times are not its own
            store.save()
    plans.planning_time_s = round(time.perf_counter() - t0, 2)
    plans.measurements = {"reused": store.hits, "measured": store.misses}
    if store.busy:
        plans.notes.insert(0, f"busy machine: other processes used up to {max(store.busy):.0%} of the CPUs while "
                              f"{len(store.busy)} setup(s) were timed, so those steps measured slower than they are "
                              f"on a quiet machine and the plan may be smaller; they were not kept. "
                              f"`autoseg plan` again when it is quiet")
    elif not probed and (load := max(load_before, busy_load(info.type))):
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


def get_planner(name_or_path: str) -> Planner:
    """A registered planner by name (the built-in ones are registered on import), or the planner a Python
    file defines."""
    if name_or_path in PLANNERS:
        return PLANNERS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"{path}: planner file not found")
        before = dict(PLANNERS)
        spec = importlib.util.spec_from_file_location(f"autoseg_user_planner_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: report it as their file's problem
            raise UserError(f"{path}: the planner file failed to load ({type(e).__name__}: {e})") from e
        # by identity, not name: loading the same file again re-registers its names with new functions
        new = [n for n, fn in PLANNERS.items() if before.get(n) is not fn]
        if new:
            return PLANNERS[new[0]]
        if callable(getattr(module, "plan", None)):
            return module.plan
        raise UserError(f"{path}: defines no planner (decorate a function with @register_planner or name it `plan`)")
    raise UserError(f"unknown planner '{name_or_path}' (known: {', '.join(sorted(PLANNERS))}, or a path to a .py file)")
