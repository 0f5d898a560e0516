"""Adapting a deployed model to a site (issue 22): fine-tuning a bundle on a few cases of a shifted scanner
setting, against training from scratch on those cases at the same budget.

    python benchmarks/finetune.py [--task mri-nested] [--size tiny] [--source-cases 16] [--site-cases 4]
                                  [--test-cases 8] [--scanner gamma=0.4,noise=0.03,blur=0.6]
                                  [--source-budget 3m] [--budget 2m]

Every step is the command line a user runs, under benchmarks/work/finetune/:

1. source: ``autoseg synth TASK`` (the task's own scanner, seed 0), ``autoseg plan --budget SOURCE``,
   ``autoseg train`` -> the deployed bundle;
2. the site: the same task imaged with ``--scanner`` (``autoseg synth --scanner``), ``--site-cases`` labelled
   cases (seed 1) to adapt on and ``--test-cases`` others (seed 2) to score on;
3. on the site's test cases: the source bundle as it is (no adaptation); ``autoseg train SITE --init bundle
   --budget B`` (fine-tuned: the bundle's plans, lr x0.1, the rule's steps; all its folds, and fold 0 alone);
   ``autoseg plan SITE --budget B`` + ``autoseg train`` (from scratch on the same cases and budget); the source
   bundle on the source setting's own test cases, for reference.

Dice from ``autoseg evaluate`` (mean over the test cases, per class). Writes benchmarks/results/finetune.md.
Every process runs under ``nice -n 19`` with one torch thread: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "finetune"
RESULTS = BENCH / "results" / "finetune.md"


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AUTOSEG_CACHE_DIR": "off"}


def autoseg(*args: str) -> float:
    """Run one autoseg command; its wall time in seconds (its output kept in WORK/log.txt)."""
    t = time.perf_counter()
    with open(WORK / "log.txt", "a") as log:
        log.write(f"\n$ autoseg {' '.join(args)}\n")
        log.flush()
        subprocess.run(["nice", "-n", "19", sys.executable, "-m", "autoseg", "-q", *args], env=environment(),
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t


def dice(model: Path, images: Path, labels: Path, dataset_json: Path, name: str, *extra: str) -> dict[str, float]:
    pred = WORK / "predictions" / name
    shutil.rmtree(pred, ignore_errors=True)
    autoseg("predict", str(model), str(images), str(pred), *extra)
    metrics = WORK / "metrics" / f"{name}.json"
    autoseg("evaluate", str(pred), str(labels), "--dataset-json", str(dataset_json), "-o", str(metrics))
    summary = json.loads(metrics.read_text())["summary"]
    return {**{c: v["dice"]["mean"] for c, v in summary["per_class"].items()},
            "mean": summary["foreground_mean"]["dice"]}


def trained_steps(work: Path) -> str:
    steps = []
    for log in sorted(work.glob("runs/*/fold_*/log.csv")):
        rows = log.read_text().strip().splitlines()
        steps.append(rows[-1].split(",")[0] if len(rows) > 1 else "0")
    return "+".join(steps) or "0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mri-nested")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--source-cases", type=int, default=16)
    ap.add_argument("--site-cases", type=int, default=4)
    ap.add_argument("--test-cases", type=int, default=8)
    ap.add_argument("--scanner", default="gamma=0.4,noise=0.03,blur=0.6")
    ap.add_argument("--source-budget", default="3m")
    ap.add_argument("--budget", default="2m")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    data, runs = WORK / "data", WORK / "runs"
    source, site, site_test, source_test = (data / n for n in ("source", "site", "site_test", "source_test"))
    t0 = time.time()
    autoseg("synth", a.task, str(source), "--size", a.size, "--cases", str(a.source_cases), "--seed", "0")
    autoseg("synth", a.task, str(source_test), "--size", a.size, "--cases", str(a.test_cases), "--seed", "2")
    autoseg("synth", a.task, str(site), "--size", a.size, "--cases", str(a.site_cases), "--seed", "1",
            "--scanner", a.scanner)
    autoseg("synth", a.task, str(site_test), "--size", a.size, "--cases", str(a.test_cases), "--seed", "2",
            "--scanner", a.scanner)

    rows = []
    w_source = runs / "source"
    t = autoseg("plan", str(source), "-w", str(w_source), "--budget", a.source_budget, "-j", "1")
    t += autoseg("train", str(source), "-w", str(w_source))
    bundle = w_source / "model.autoseg"
    site_json = site_test / "dataset.json"
    test_in, test_ref = site_test / "imagesTr", site_test / "labelsTr"
    rows.append(("source bundle, source setting's test cases (reference)", f"{a.source_cases} source",
                 trained_steps(w_source), t, dice(bundle, source_test / "imagesTr", source_test / "labelsTr",
                                                  source_test / "dataset.json", "source_on_source")))
    rows.append(("source bundle as it is (no adaptation)", "-", "-", 0.0,
                 dice(bundle, test_in, test_ref, site_json, "source_on_site")))

    w_ft = runs / "finetune"
    t = autoseg("train", str(site), "-w", str(w_ft), "--init", str(bundle), "--budget", a.budget)
    ft = w_ft / "model.autoseg"
    plans = json.loads((w_ft / "plans.json").read_text())
    folds = sorted({r["fold"] for r in plans["train_runs"]})
    rows.append((f"fine-tuned from the bundle (folds {','.join(map(str, folds))})", f"{a.site_cases} site",
                 trained_steps(w_ft), t, dice(ft, test_in, test_ref, site_json, "finetune")))
    if len(folds) > 1:
        rows.append(("fine-tuned, fold 0 alone", f"{a.site_cases} site", trained_steps(w_ft).split("+")[0], t,
                     dice(ft, test_in, test_ref, site_json, "finetune_fold0", "--folds", "0")))

    w_scratch = runs / "scratch"
    t = autoseg("plan", str(site), "-w", str(w_scratch), "--budget", a.budget, "-j", "1")
    t += autoseg("train", str(site), "-w", str(w_scratch))
    rows.append(("from scratch on the site's cases, same budget", f"{a.site_cases} site", trained_steps(w_scratch),
                 t, dice(w_scratch / "model.autoseg", test_in, test_ref, site_json, "scratch")))
    write(a, rows, plans, time.time() - t0)


def write(a: argparse.Namespace, rows: list, ft_plans: dict, total_s: float) -> None:
    classes = [c for c in rows[0][4] if c != "mean"]
    cfg = next(iter(ft_plans["configurations"].values()))
    lines = [
        "# Fine-tuning a deployed model on a few cases of a new scanner setting (issue 22)", "",
        f"`python benchmarks/finetune.py --task {a.task} --size {a.size} --source-cases {a.source_cases} "
        f"--site-cases {a.site_cases} --test-cases {a.test_cases} --scanner {a.scanner} "
        f"--source-budget {a.source_budget} --budget {a.budget}`", "",
        f"Source: `autoseg synth {a.task} --size {a.size}` ({a.source_cases} cases, seed 0), trained with "
        f"`autoseg plan --budget {a.source_budget}` + `autoseg train`. Site: the same task imaged with "
        f"`--scanner {a.scanner}` ({a.site_cases} labelled cases, seed 1); scored on {a.test_cases} other cases "
        f"of the site's setting (seed 2) with `autoseg predict` + `autoseg evaluate` (mean Dice over cases).", "",
        f"Fine-tuning: `autoseg train SITE --init source/model.autoseg --budget {a.budget}`: the bundle's plans, "
        f"lr {cfg['optimizer']['lr']:g} ({cfg['optimizer']['name']}, the bundle's x {ft_plans['finetune']['rule']['lr_factor']}), "
        f"{cfg['schedule']['steps']} steps per run (the rule: fewest of the budget's, "
        f"{ft_plans['finetune']['rule']['steps_per_case']} per training case, at least "
        f"{ft_plans['finetune']['rule']['min_steps']}, and half the bundle's planned steps). From scratch: "
        f"`autoseg plan SITE --budget {a.budget}` + `autoseg train` (the planner's own network and steps).", "",
        "| model | trained on | steps (per run) | train wall s | " + " | ".join(classes) + " | mean |",
        "|---|---|---|---|" + "---|" * (len(classes) + 1),
    ]
    for name, cases, steps, seconds, d in rows:
        lines.append(f"| {name} | {cases} | {steps} | {seconds:.0f} | "
                     + " | ".join(_f(d.get(c)) for c in classes) + f" | {_f(d['mean'])} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other "
              "agents' work and a background benchmark (loaded): every process under `nice -n 19` with one torch "
              f"thread; wall times are this shared machine's. The whole benchmark took {total_s / 60:.1f} min. "
              "Small sizes and short budgets: one source model, one site, one seed each; differences of a few "
              "hundredths are within what another seed moves.", ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
