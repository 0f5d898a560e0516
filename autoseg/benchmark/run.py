"""``autoseg benchmark SUITE_FILE -o DIR``: every (dataset, method) cell of a suite, then the leaderboard.

Cells run one after another (they measure time, so they must not share the machine). A finished cell whose
dataset, method, budget and device are unchanged is skipped on a re-run; a failed or skipped one is tried
again. A failing cell is recorded as failed with a one-line reason and the path of its log, and the rest go
on. The leaderboard is rewritten after every cell, so it is current even when the run is interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from autoseg.benchmark.cells import (
    DONE,
    cell_file,
    finished,
    lesion_classes_of,
    load_record,
    rescore_lesions,
    run_cell,
    signature,
)
from autoseg.benchmark.datasets import prepare_dataset
from autoseg.benchmark.leaderboard import write_leaderboard
from autoseg.benchmark.measure import machine
from autoseg.benchmark.suite import Suite, load_suite
from autoseg.errors import UserError
from autoseg.plan.budget import format_duration, parse_duration


def select(suite: Suite, budget: str | None = None, datasets: list[str] | None = None,
           methods: list[str] | None = None) -> Suite:
    """The suite with its budget overridden (every method's too) and only the named datasets and methods."""
    if budget is not None:
        seconds = parse_duration(budget)
        suite = dataclasses.replace(suite, budget_s=seconds, methods=tuple(
            dataclasses.replace(m, budget_s=None) for m in suite.methods))
    for names, attr in ((datasets, "datasets"), (methods, "methods")):
        if names:
            known = {x.name: x for x in getattr(suite, attr)}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UserError(f"{suite.file}: no {attr[:-1]} '{unknown[0]}' (it has {', '.join(known)})")
            suite = dataclasses.replace(suite, **{attr: tuple(known[n] for n in names)})
    return suite


def run_benchmark(suite_file: Path | str, out: Path | str, budget: str | None = None,
                  datasets: list[str] | None = None, methods: list[str] | None = None,
                  cache: Path | None = None, progress: bool = True) -> list[dict]:
    """Run (or resume) every cell of the suite into ``out`` and write the leaderboard; returns the records."""
    original = load_suite(suite_file)
    everything = select(original, budget)
    suite = select(everything, None, datasets, methods)
    header = _run_note(original, budget, datasets, methods)
    out = Path(out).resolve()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    total = len(suite.datasets) * len(suite.methods)

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    say(f"suite {suite.name}: {len(suite.datasets)} dataset(s) x {len(suite.methods)} method(s), "
        f"{format_duration(suite.budget_s)} per run, into {out}")
    k = 0
    for dataset in suite.datasets:
        data, note, error, lesions = None, "", None, []
        todo = [m for m in suite.methods if not finished(cell_file(out, dataset, m), signature(suite, dataset, m))]
        unscored = [m for m in suite.methods if m not in todo and _lacks_lesions(out, dataset, m)]
        if todo or unscored:
            try:
                data, note = prepare_dataset(dataset, out, cache)
                lesions = lesion_classes_of(data, suite.jobs)
            except UserError as e:
                error = f"dataset: {e}"
        for method in suite.methods:
            k += 1
            head = f"[{k}/{total}] {dataset.name} / {method.name}"
            done = finished(cell_file(out, dataset, method), signature(suite, dataset, method))
            if done:
                if data is not None and method in unscored and rescore_lesions(done, out, dataset, method, data,
                                                                               lesions, suite.jobs):
                    say(f"{head}: lesion-wise metrics added from its stored predictions")
                say(f"{head}: finished earlier, skipped ({_result(done)})")
                records.append(done)
                continue
            say(f"{head}: running")
            record = run_cell(suite, dataset, method, data, out, note=note, data_error=error, progress=progress,
                              lesion_classes=lesions)
            say(f"{head}: {_result(record)}")
            records.append(record)
            write_leaderboard(everything, _all_records(everything, out), out, machine(), header)
    paths = write_leaderboard(everything, _all_records(everything, out), out, machine(), header)
    say("wrote " + ", ".join(str(p) for p in paths))
    return records


def _lacks_lesions(out: Path, dataset, method) -> bool:
    """A finished cell scored before lesion-wise metrics existed (its predictions may still be there)."""
    record = load_record(cell_file(out, dataset, method)) or {}
    return record.get("status") == DONE and "lesions" not in (record.get("metrics") or {})


def _all_records(suite: Suite, out: Path) -> list[dict]:
    """The records in ``out`` of every cell of ``suite`` run with its current settings (filtered runs add up)."""
    found = []
    for d in suite.datasets:
        for m in suite.methods:
            r = load_record(cell_file(out, d, m))
            if r and r.get("signature") == json.loads(json.dumps(signature(suite, d, m))):
                found.append(r)
    return found


def _run_note(suite: Suite, budget: str | None, datasets: list[str] | None, methods: list[str] | None) -> list[str]:
    if budget is None and not datasets and not methods:
        return []
    bits = []
    if budget is not None:
        bits.append(f"the budget set to {format_duration(parse_duration(budget))} per run "
                    f"(the suite file says {format_duration(suite.budget_s)})")
    if datasets:
        bits.append("datasets " + ", ".join(datasets) + " (of " + ", ".join(d.name for d in suite.datasets) + ")")
    if methods:
        bits.append("methods " + ", ".join(methods) + " (of " + ", ".join(m.name for m in suite.methods) + ")")
    return ["Last invocation: " + "; ".join(bits) + " (cells of earlier invocations with the same settings are kept).", ""]


def _result(record: dict) -> str:
    if record["status"] != DONE:
        return f"{record['status']}: {record.get('reason', '')}"
    dice = record["metrics"]["foreground"]["dice"]
    return f"foreground Dice {'-' if dice is None else f'{dice:.3f}'} in {record.get('total_s', 0):.0f}s"
