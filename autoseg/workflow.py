"""Stages chained as the CLI runs them: ``plan_dataset`` = validate -> fingerprint -> plan -> preprocess."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.errors import DatasetError
from autoseg.fingerprint import FINGERPRINT_FILE, Fingerprint, extract_fingerprint
from autoseg.plan.model import PLANS_FILE, Plans
from autoseg.workdir import resolve_workdir


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
                 replan: bool = False, progress: bool = False, folds: int = 5) -> PlanResult:
    """Validate, fingerprint, plan and preprocess ``dataset`` into ``workdir``.

    An existing ``plans.json`` made from the same dataset, planner, budget and device is kept as it is
    (so a user's edits survive a re-run); ``replan=True`` makes a new one.
    """
    import time

    from autoseg.plan.budget import parse_duration
    from autoseg.plan.make import make_plans
    from autoseg.preprocess import preprocess
    from autoseg.validate import validate_dataset

    work = resolve_workdir(dataset, workdir)
    timings = {}
    t = time.perf_counter()
    problems = validate_dataset(dataset, jobs=jobs, progress=progress)
    if problems:
        raise DatasetError(problems)
    timings["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    fp = extract_fingerprint(dataset, jobs=jobs, progress=progress)
    fp.save(work / FINGERPRINT_FILE)
    timings["fingerprint"] = time.perf_counter() - t

    t = time.perf_counter()
    plans_path = work / PLANS_FILE
    budget_s = None if budget is None else (float(budget) if isinstance(budget, (int, float)) else parse_duration(budget))
    plans, replanned = None, True
    if plans_path.is_file() and not replan:
        existing = Plans.load(plans_path)
        if _same_request(existing, fp, planner, budget_s, device):
            plans, replanned = existing, False
    if plans is None:
        if progress:
            print("planning: measuring candidate networks on the device ...", file=sys.stderr)
        plans = make_plans(fp, planner, budget_s, device, folds)
        plans.save(plans_path)
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    done = preprocess(dataset, work, plans, fp, jobs=jobs, progress=progress)
    timings["preprocess"] = time.perf_counter() - t
    return PlanResult(work, fp, plans, replanned, done, timings)


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
                     f"{m.step_time_s:.3f} s/step{' (extrapolated)' if m.extrapolated else ''}, "
                     f"{m.peak_memory_mb:.0f} MiB, {c.schedule.steps} steps = "
                     f"{format_duration(c.schedule.steps * m.step_time_s)} per run")
    runs = p.train_runs
    if runs:
        configs = sorted({r["configuration"] for r in runs}, key=[r["configuration"] for r in runs].index)
        folds = sorted({r["fold"] for r in runs})
        lines.append(f"training: {len(runs)} run(s) ({', '.join(configs)}; folds {folds}) of "
                     f"{format_duration(runs[0]['seconds'])} each")
    for n in p.notes:
        if n.startswith("budget"):
            lines.append(n)
    lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    pre = ", ".join(f"{k} {v}" for k, v in result.preprocessed.items())
    lines.append(f"preprocessed (cases computed): {pre}")
    lines.append(f"wrote {result.workdir / PLANS_FILE}")
    return "\n".join(lines)


def _fmt(v: list[float]) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"
