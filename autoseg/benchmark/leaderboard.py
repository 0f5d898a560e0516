"""The leaderboard from the cell records: ``leaderboard.md`` (for people), ``leaderboard.csv`` (one row per
cell and class) and ``leaderboard.png`` (foreground Dice per dataset and method)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from autoseg.artifacts import atomic_write_bytes
from autoseg.benchmark.cells import DONE
from autoseg.benchmark.suite import Suite
from autoseg.plan.budget import format_duration

STAGES = ("plan", "train", "predict", "evaluate")
LESION_COLUMNS = ("lesion_dice", "brats_f1", "f1", "pq")  # metrics["lesions"][class] keys; CSV column "lesion_<key>"
CSV_COLUMNS = ("dataset", "method", "status", "class", "dice", "nsd", "hd95_mm", "test_cases", "budget_s",
               *(f"{s}_s" for s in STAGES), "total_s", "cpu_s", "peak_pss_mb", "reason",
               *("lesion_dice" if k == "lesion_dice" else f"lesion_{k}" for k in LESION_COLUMNS))
MD_FILE, CSV_FILE, PLOT_FILE = "leaderboard.md", "leaderboard.csv", "leaderboard.png"


def stage_seconds(record: dict) -> dict[str, float]:
    """Wall seconds per pipeline stage: measured by the cell, or as a command reported them (its own clock)."""
    stages = record.get("stages") or {}
    out = {name: s["wall_s"] for name, s in stages.items() if name in STAGES}
    reported = (record.get("reported") or {}).get("stages") or {}
    for name, s in reported.items():
        if name in STAGES and name not in out:
            out[name] = s["wall_s"] if isinstance(s, dict) else float(s)
    return out


def peak_mb(record: dict) -> float | None:
    """The largest peak (PSS of the process tree) over the cell's stages."""
    peaks = [s.get("peak_pss_mb") for s in (record.get("stages") or {}).values() if s.get("peak_pss_mb")]
    return max(peaks) if peaks else None


def cpu_seconds(record: dict) -> float | None:
    """CPU seconds (user + system) of all the cell's process trees: the work done, whatever the load."""
    cpu = [s["cpu_s"] for s in (record.get("stages") or {}).values() if s.get("cpu_s") is not None]
    return sum(cpu) if cpu else None


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}s"


def write_leaderboard(suite: Suite, records: list[dict], out: Path, machine: dict[str, str],
                      header_lines: list[str] | None = None) -> list[Path]:
    """Write the three files into ``out`` (each atomically) and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / MD_FILE
    atomic_write_bytes(render_markdown(suite, records, machine, header_lines).encode(), md)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(records))
    atomic_write_bytes(buf.getvalue().encode(), out / CSV_FILE)
    written = [md, out / CSV_FILE]
    plot = write_plot(records, out / PLOT_FILE)
    return written + ([plot] if plot else [])


def csv_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        times = stage_seconds(r)
        base = {"dataset": r["dataset"], "method": r["method"], "status": r["status"], "budget_s": r.get("budget_s"),
                **{f"{s}_s": _round(times.get(s)) for s in STAGES}, "total_s": r.get("total_s"),
                "cpu_s": _round(cpu_seconds(r)),
                "peak_pss_mb": _round(peak_mb(r)), "reason": r.get("reason", "")}
        metrics = r.get("metrics")
        if r["status"] != DONE or not metrics:
            rows.append({**base, "class": ""})
            continue
        classes = [*metrics["per_class"].items(), ("foreground_mean", metrics["foreground"])]
        lesions = metrics.get("lesions") or {}
        for name, m in classes:
            les = lesions.get(name, {})
            rows.append({**base, "class": name, "test_cases": metrics["cases"],
                         **{k: _round(m.get(k), 4) for k in ("dice", "nsd", "hd95_mm")},
                         **{("lesion_dice" if k == "lesion_dice" else f"lesion_{k}"): _round(les.get(k), 4)
                            for k in LESION_COLUMNS}})
    return rows


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _lesion_lines(dataset: str, methods: list[str], by: dict) -> list[str]:
    """Per done cell and lesion class: lesion-wise Dice and detection F1 (BraTS 2023 matching), F1 and PQ under
    one-to-one IoU > 0.5 matching, pooled over the test cases' lesions."""
    rows = [(m, c, v) for m in methods if by.get((dataset, m), {}).get("status") == DONE
            for c, v in ((by[dataset, m].get("metrics") or {}).get("lesions") or {}).items()]
    if not rows:
        return []
    out = ["", "Lesion-wise, pooled over the test cases' lesions (`autoseg evaluate`; lesion classes: dataset.json's "
           "instance classes and the fingerprint's small classes):", "",
           "| method | class | reference lesions | lesion-wise Dice (BraTS) | F1 (BraTS) | F1 (IoU > 0.5) | PQ |",
           "|---|---|---|---|---|---|---|"]
    for m, c, v in rows:
        out.append(f"| {m} | {c} | {v.get('n_ref', '-')} | {_f(v.get('lesion_dice'))} | {_f(v.get('brats_f1'))} "
                   f"| {_f(v.get('f1'))} | {_f(v.get('pq'))} |")
    return out


def _onset_lines(dataset: str, methods: list[str], by: dict) -> list[str]:
    """Per autoseg cell and class: the first step (and seconds, share of the run) at validation Dice 0.5."""
    rows = [(m, by[dataset, m]["onsets"]) for m in methods if by.get((dataset, m), {}).get("onsets")]
    if not rows:
        return []
    classes = list(dict.fromkeys(c for _, onsets in rows for c in onsets))
    out = ["", "Time to Dice 0.5 on the validation patches (step, seconds, share of the run's steps; - never):", "",
           "| method | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for m, onsets in rows:
        cells = []
        for c in classes:
            o = onsets.get(c) or {}
            cells.append("-" if o.get("step") is None else f"{o['step']} / {o['seconds']:.0f}s / {o['share']:.0%}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def render_markdown(suite: Suite, records: list[dict], machine: dict[str, str],
                    header_lines: list[str] | None = None) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    by = {(r["dataset"], r["method"]): r for r in records}
    lines = [f"# Leaderboard: suite `{suite.name}`", "",
             f"Written by `autoseg benchmark {suite.file.name}`. Each cell is one method on one dataset, end to end: "
             f"plan, train fold 0 for a wall-clock budget of **{format_duration(suite.budget_s)}** per run "
             f"(unless a method sets its own), predict the held-out test cases, and score them with `autoseg "
             f"evaluate` (Dice and NSD per class, mean over test cases; NSD at a tolerance of each case's largest "
             f"voxel spacing; HD95 in mm, mean over cases where both masks are non-empty). Device: {suite.device}; "
             f"{suite.jobs} worker processes for planning and evaluation.", ""]
    if suite.notes:
        lines += [suite.notes, ""]
    lines += header_lines or []
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    loads = [r["load_before"] for r in records if r.get("load_before") is not None]
    if loads:
        lines.append(f"- load average (1 min) when each cell started: {min(loads):.1f}-{max(loads):.1f}")
    lines += ["", "## Foreground Dice (mean over classes and test cases)", "",
              "| dataset | " + " | ".join(methods) + " | test cases | note |",
              "|---|" + "---|" * len(methods) + "---|---|"]
    for d in datasets:
        cells = []
        best = max((by[d, m]["metrics"]["foreground"]["dice"] or 0 for m in methods
                    if (d, m) in by and by[d, m]["status"] == DONE), default=None)
        for m in methods:
            r = by.get((d, m))
            if r is None:
                cells.append("")
            elif r["status"] != DONE:
                cells.append(r["status"])
            else:
                dice = r["metrics"]["foreground"]["dice"]
                text = _f(dice)
                cells.append(f"**{text}**" if dice is not None and dice == best and len(methods) > 1 else text)
        any_r = next(by[d, m] for m in methods if (d, m) in by)
        n = next((by[d, m]["metrics"]["cases"] for m in methods if (d, m) in by and by[d, m].get("metrics")), "-")
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {n} | {any_r.get('note', '')} |")
    lines += [""]
    for d in datasets:
        any_r = next(by[d, m] for m in methods if (d, m) in by)
        lines += [f"## {d}", "", f"Source: {any_r.get('dataset_source', '')}. {any_r.get('note', '')}", "",
                  "| method | status | Dice | NSD | HD95 mm | Dice per class | plan | train | predict | evaluate "
                  "| total | CPU s | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            r = by.get((d, m))
            if r is None:
                continue
            t = stage_seconds(r)
            stage_cols = " | ".join(_sec(t.get(s)) for s in STAGES)
            if r["status"] == DONE:
                fg = r["metrics"]["foreground"]
                per = ", ".join(f"{c} {_f(v['dice'])}" + (f" ({_f(v['dice_present'])} on {v['cases_present']})"
                                                            if v.get("cases_present", 0) < r["metrics"]["cases"]
                                                            and v.get("dice_present") is not None else "")
                                for c, v in r["metrics"]["per_class"].items())
                lines.append(f"| {m} | done | {_f(fg['dice'])} | {_f(fg['nsd'])} | {_f(fg['hd95_mm'], '.1f')} | {per} "
                             f"| {stage_cols} | {_sec(r.get('total_s'))} | {_f(cpu_seconds(r), '.0f')} | {_f(peak_mb(r), '.0f')} |")
            else:
                lines.append(f"| {m} | {r['status']} | - | - | - | {r.get('reason', '')} | {stage_cols} "
                             f"| {_sec(r.get('total_s'))} | {_f(cpu_seconds(r), '.0f')} | {_f(peak_mb(r), '.0f')} |")
        lines += _lesion_lines(d, methods, by)
        lines += _onset_lines(d, methods, by)
        lines.append("")
    lines += ["## Methods", ""]
    for m in methods:
        r = next(r for r in records if r["method"] == m)
        lines.append(f"- **{m}**: {r.get('method_description', '')}")
    lines += ["", "Time per stage: wall seconds of each stage's process tree (a command method's plan/train/predict "
              "are the times it reports; its peak memory is that of its whole run). Peak MB: the largest PSS sum "
              "over the process tree of any stage, worker processes included. CPU s: user + system seconds of all the "
              "cell's processes (the work done; wall time also counts the waiting on a shared machine).", ""]
    return "\n".join(lines)


def write_plot(records: list[dict], path: Path) -> Path | None:
    """Grouped bars of foreground Dice; None when no cell is done."""
    done = [r for r in records if r["status"] == DONE and r["metrics"]["foreground"]["dice"] is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    value = {(r["dataset"], r["method"]): r["metrics"]["foreground"]["dice"] for r in done}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(datasets) + 2), 4))
    x = np.arange(len(datasets))
    for i, m in enumerate(methods):
        ys = [value.get((d, m), np.nan) for d in datasets]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, ys, width, label=m)
    ax.set_xticks(x, datasets, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("foreground Dice (test cases)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return path
