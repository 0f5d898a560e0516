"""plan + train with ``--search`` against the rules alone, at the same total budget (issue 7, Performance).

    python benchmarks/search.py [--task png-2d] [--size tiny] [--cases 30] [--test-cases 12] [--budget 6m]
                                [--trials 6]

A task of the synthetic suite and a short CPU budget, where the rules size the network to the budget's steps
(``autoseg.plan.budget.target_steps``, at least 800 steps; up to 2026-11-27 at least 150, which at a few
minutes of CPU bought a wide network and few steps: ``png-2d``: width 32, 5 stages, ~400 steps), so a smaller
network, another loss or a lighter augmentation may do better in the time (``--task vessels``: thin vessels
and small lesions, where the loss and patch matter). Both variants run the same commands as a user would, each from a fresh work folder, one after the
other:

    autoseg plan DATA -w W --budget B --device cpu [--search --trials N]
    autoseg train DATA -w W --device cpu
    autoseg predict W TEST/imagesTr PRED --device cpu
    autoseg evaluate PRED TEST/labelsTr --dataset-json DATA/dataset.json

The held-out test set is drawn with another seed than the training set (``--test-cases`` cases, more than
the generator's own imagesTs), so neither variant saw it. Writes benchmarks/results/search.md with the wall
time of each stage against the budget, the held-out Dice of both, and the search's trial table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "search"
RESULTS = HERE / "results" / "search.md"


def autoseg_bin() -> str:
    here = Path(sys.executable).parent / "autoseg"
    return str(here) if here.exists() else shutil.which("autoseg") or "autoseg"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min)"


def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd``, appending its output to ``log``; wall seconds. A failure stops the benchmark. Each variant
    has its own, at first empty, store of step measurements (``AUTOSEG_CACHE_DIR`` in its work folder): both
    plan as on a machine that never planned, and neither reads the user's store nor writes to it."""
    t = time.perf_counter()
    env = {**os.environ, "AUTOSEG_CACHE_DIR": str(log.parent / "measurements")}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t


def data(task: str, size: str, cases: int, seed: int) -> Path:
    from autoseg.synth import generate

    out = WORK / "data" / f"{task}_{size}_{cases}cases_seed{seed}"
    if not (out / "dataset.json").is_file():
        generate(task, out, cases=cases, size=size, seed=seed)
    return out


def run_variant(name: str, ds: Path, test: Path, budget: str, extra: list[str]) -> dict:
    exe = autoseg_bin()
    w = WORK / name
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    log = w / "commands.log"
    out = {"name": name, "load_before": load()}
    out["plan_s"] = timed([exe, "plan", str(ds), "-w", str(w), "--budget", budget, "--device", "cpu", *extra], log)
    out["train_s"] = timed([exe, "train", str(ds), "-w", str(w), "--device", "cpu"], log)
    pred = w / "pred_test"
    out["predict_s"] = timed([exe, "predict", str(w), str(test / "imagesTr"), str(pred), "--device", "cpu"], log)
    timed([exe, "evaluate", str(pred), str(test / "labelsTr"), "--dataset-json", str(ds / "dataset.json")], log)
    out["load_after"] = load()
    summary = json.loads((pred / "metrics.json").read_text())["summary"]
    out["dice"] = {k: v["dice"]["mean"] for k, v in summary["per_class"].items()}
    out["dice_mean"] = summary["foreground_mean"]["dice"]
    plans = json.loads((w / "plans.json").read_text())
    cfg = plans["configurations"][plans["train_runs"][0]["configuration"]]
    out["config"] = (f"{cfg['network']['family']}, width {cfg['network']['features'][0]}, "
                     f"{len(cfg['network']['features'])} stages, patch {'x'.join(map(str, cfg['patch_size']))}, "
                     f"batch {cfg['batch_size']}, loss {cfg['loss']['name']}, lr {cfg['optimizer']['lr']:.3g}, "
                     f"mirroring {cfg['augmentation']['mirror_axes'] or 'off'}, {cfg['measured']['step_time_s']:.3f} s/step")
    out["train_run_s"] = plans["train_runs"][0]["seconds"]
    out["search"] = plans.get("search") or {}
    trials = w / "search" / "trials.csv"
    out["trials"] = list(csv.DictReader(open(trials))) if trials.is_file() else []
    (w / "result.json").write_text(json.dumps(out, indent=2) + "\n")  # the numbers behind the table
    return out


def write(results: list[dict], args: argparse.Namespace, machine: dict) -> None:
    rules, search = results
    lines = ["# Search: plan + train with `--search` vs rules alone at the same total budget", "",
             "Issue 7, Performance. Generated by `benchmarks/search.py` "
             f"(`--task {args.task} --size {args.size} --cases {args.cases} --test-cases {args.test_cases} "
             f"--budget {args.budget} --trials {args.trials}`).", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["- load average before / after each variant: "
              + "; ".join(f"{r['name']}: {r['load_before']} / {r['load_after']}" for r in results),
              "- the machine is shared with other work: wall-clock budgets buy fewer steps when it is busy, "
              "for both variants alike (they ran one after the other)", "",
              "## Held-out Dice at the same total budget", "",
              f"Task `{args.task}` ({args.size}, {args.cases} training cases), {args.test_cases} held-out test "
              "cases generated with another seed. Budget "
              f"{args.budget} for plan + train in both; each column is one run.", "",
              "| variant | plan s | train s | plan + train s | final training run | "
              + " | ".join(f"Dice {k}" for k in rules["dice"]) + " | mean Dice | chosen configuration |",
              "|---|---|---|---|---|" + "---|" * len(rules["dice"]) + "---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['plan_s']:.0f} | {r['train_s']:.0f} | {r['plan_s'] + r['train_s']:.0f} | "
                     f"{r['train_run_s']:.0f} s | "
                     + " | ".join(f"{v:.3f}" if v is not None else "n/a" for v in r["dice"].values())
                     + f" | **{r['dice_mean']:.3f}** | {r['config']} |")
    s = search["search"]
    diff = search["dice_mean"] - rules["dice_mean"]
    lines += ["", f"Mean held-out Dice, search minus rules: **{diff:+.3f}**. Prediction of the test cases took "
              f"{rules['predict_s']:.0f} s (rules) and {search['predict_s']:.0f} s (search), outside the budget.", ""]
    if s:
        b = s.get("budget", {})
        lines += ["## The search", "",
                  f"Budget division printed by `autoseg plan --search`: total {b.get('total_s', 0):.0f} s, search "
                  f"{b.get('search_s', 0):.0f} s ({b.get('trials')} trials of up to {b.get('trial_s', 0):.0f} s), "
                  f"final training {b.get('train_s', 0):.0f} s. Trials: {s['trials']}. Chosen: trial "
                  f"{s['best_trial']} ({s['chosen']}), fold-0 validation Dice {s['best_value']:.4f} against the "
                  f"rules' point's {s['rules_value'] if s['rules_value'] is None else round(s['rules_value'], 4)}."
                  + (f" The final training of fold 0 started from trial {s['warm_start']['trial']}'s weights "
                     "(`search.warm_start` in plans.json)." if s.get("warm_start") else ""),
                  "", "Trial table (`search/trials.csv`; dice = sliding-window Dice of fold 0's held-out cases, for completed trials; a pruned trial's last patch Dice is in its note):", ""]
        cols = ["trial", "state", "rules", "dice", "family", "depth", "width", "patch", "loss", "lr",
                "augmentation", "batch", "mirror", "parameters", "step_time_s", "steps", "duration_s", "note"]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(t.get(c, "")) for c in cols) + " |" for t in search["trials"]]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="png-2d")
    p.add_argument("--size", default="tiny")
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--test-cases", type=int, default=12)
    p.add_argument("--budget", default="6m")
    p.add_argument("--trials", type=int, default=6)
    args = p.parse_args()
    from autoseg.benchmark.measure import machine

    ds = data(args.task, args.size, args.cases, seed=0)
    test = data(args.task, args.size, args.test_cases, seed=1000)
    results = [run_variant("rules", ds, test, args.budget, []),
               run_variant("search", ds, test, args.budget, ["--search", "--trials", str(args.trials)])]
    for r in results:
        print(f"{r['name']}: plan {r['plan_s']:.0f}s + train {r['train_s']:.0f}s, held-out Dice {r['dice_mean']:.3f}")
    write(results, args, machine())


if __name__ == "__main__":
    main()
