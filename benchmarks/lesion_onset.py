"""When does a small class start to be learned, with SGD and with AdamW (two step sizes), at the same number of steps?

    python benchmarks/lesion_onset.py [--tasks ct-aniso vessels lung-nodules mr-2ch mri-nested] [--budget 5m]
                                      [--variants sgd adamw-1e-3 adamw]

The evidence behind the planner's optimizer rule (autoseg.plan.rules.optimizer). For each synthetic task: the
dataset (size small, seed 0) is planned once for ``--budget``; the planned run is then trained from the same
plans.json once per variant: the rules before the optimizer rule (SGD, Nesterov, lr 1e-2), AdamW at Adam's usual
lr 1e-3, and AdamW at ``autoseg.plan.rules.ADAMW_LR`` (the rule), each for the plan's number of steps (``autoseg
train --steps``: the same steps whatever the machine's load, so the runs differ by the optimizer alone), then the
test cases are predicted and scored. Reported per class: test Dice on the cases that hold the class,
the first step at validation Dice 0.2 and 0.5, and what the network says inside the class (mean probability of
the class there, and the share of its voxels where it wins the argmax).

Writes benchmarks/results/lesion_onset.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from autoseg.benchmark.measure import machine  # noqa: E402
from autoseg.oof import fold_predictor  # noqa: E402
from autoseg.plan import rules  # noqa: E402
from autoseg.trainlog import TrainLog  # noqa: E402
from autoseg.workdir import Workdir, load_case  # noqa: E402

# variant -> (label, the optimizer's values in plans.json)
VARIANTS = {"sgd": ("SGD 1e-2", {"name": "sgd", "lr": 1e-2}), "adamw-1e-3": ("AdamW 1e-3", {"name": "adamw", "lr": 1e-3}),
            "adamw": (f"AdamW {rules.ADAMW_LR:g} (the rule)", {"name": "adamw", "lr": rules.ADAMW_LR})}


def autoseg(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "autoseg", "-q", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def inside(work: Workdir, configuration: str, value: int) -> tuple[float, float]:
    """(mean probability of class ``value`` over its voxels, share of them where it wins) on the training cases
    that hold it, from the fold-0 network on the preprocessed cache."""
    plans = work.load_plans()
    predictor = fold_predictor(work.run(configuration, 0), plans, configuration, 0, "cpu")
    probs_in, wins = [], []
    for cid in work.cached_cases(configuration):
        data, seg, _ = load_case(work.preprocessed(configuration), cid)
        mask = np.asarray(seg) == value
        if mask.any():
            p = predictor.preprocessed_probabilities(np.asarray(data)).float().numpy()
            probs_in.append(float(p[value][mask].mean()))
            wins.append(float((p.argmax(0)[mask] == value).mean()))
    return (float(np.mean(probs_in)), float(np.mean(wins))) if probs_in else (float("nan"), float("nan"))


def run_task(task: str, budget: str, work_root: Path, variants: list[str]) -> dict:
    data = work_root / "data" / task
    if not (data / "dataset.json").is_file():
        autoseg("synth", task, str(data), "--size", "small")
    planned = work_root / "planned" / task
    env = {**os.environ, "AUTOSEG_CACHE_DIR": str(work_root / "store")}
    if not (planned / "plans.json").is_file():
        autoseg("plan", str(data), "-w", str(planned), "--budget", budget, env=env)
    plans = json.loads((planned / "plans.json").read_text())
    configuration = plans["train_runs"][0]["configuration"]
    steps = plans["configurations"][configuration]["schedule"]["steps"]
    labels = {k: v for k, v in plans["labels"].items() if k not in ("background", "ignore") and isinstance(v, int)}
    out = {"configuration": configuration, "steps": steps, "runs": {}}
    for variant in variants:
        label, values = VARIANTS[variant]
        w = work_root / "runs" / task / variant
        shutil.rmtree(w, ignore_errors=True)
        shutil.copytree(planned, w, ignore=shutil.ignore_patterns("runs", "selection.json", "model.autoseg"))
        edited = json.loads((w / "plans.json").read_text())
        edited["configurations"][configuration]["optimizer"].update(values)
        (w / "plans.json").write_text(json.dumps(edited, indent=1))
        autoseg("train", str(data), "-w", str(w), "--steps", str(steps), "--fold", "0", "--config", configuration)
        autoseg("predict", str(w), str(data / "imagesTs"), str(w / "pred"), "--folds", "0", "--config", configuration)
        autoseg("evaluate", str(w / "pred"), str(data / "labelsTs"), "--dataset-json", str(data / "dataset.json"),
                "-o", str(w / "metrics.json"))
        metrics = json.loads((w / "metrics.json").read_text())
        work = Workdir(w)
        log = TrainLog(work.run(configuration, 0), {v: k for k, v in labels.items()})
        onsets, starts = log.onsets(), log.onsets(0.2)
        per_class = {}
        for name, value in labels.items():
            present = [c["classes"][name]["dice"] for c in metrics["cases"].values()
                       if (c["classes"][name].get("volume_ref_mm3") or 0) > 0]
            p_in, won = inside(work, configuration, value)
            per_class[name] = {"dice_present": float(np.mean(present)) if present else None,
                               "onset_step": onsets[name].step, "start_step": starts[name].step,
                               "p_inside": p_in, "wins": won}
        out["runs"][label] = per_class
        print(task, label, json.dumps(per_class), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["ct-aniso", "vessels", "lung-nodules", "mr-2ch", "mri-nested"])
    p.add_argument("--budget", default="5m", help="the budget planned for; its step count is trained (default 5m)")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "lesion_onset")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "lesion_onset.md")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    a = p.parse_args()
    results = {t: run_task(t, a.budget, a.work, a.variants) for t in a.tasks}

    def f(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None or x != x else format(x, fmt)

    names = [VARIANTS[v][0] for v in a.variants]
    lines = ["# Small classes: SGD against AdamW at the same step count (benchmarks/lesion_onset.py)", "",
             f"`python benchmarks/lesion_onset.py --tasks {' '.join(a.tasks)} --budget {a.budget} --variants "
             f"{' '.join(a.variants)}`: each task planned for {a.budget}, then its planned run trained for the plan's "
             "steps once per variant.", "",
             "| task | class | steps | " + " | ".join(f"{n}: test Dice (0.2 / 0.5 at step; p inside / wins)" for n in names)
             + " |", "|---|---|---|" + "---|" * len(names)]
    for task, r in results.items():
        for name in r["runs"][names[0]]:
            cells = [f"{f(x['dice_present'])} ({x['start_step'] or '-'} / {x['onset_step'] or '-'}; "
                     f"{f(x['p_inside'], '.2f')} / {f(x['wins'], '.2f')})" for x in (r["runs"][n][name] for n in names)]
            lines.append(f"| {task} | {name} | {r['steps']} | " + " | ".join(cells) + " |")
    lines += ["", "Test Dice: mean over the test cases whose reference holds the class. 0.2 / 0.5 at step: the first "
              "validation (patches) at Dice 0.2 and 0.5 (- never). p inside / wins: on the training cases, the class's mean probability over its "
              "own voxels and the share of them where it wins the argmax (0.02 / 0.00 is a network that has not "
              "started on the class: the same small probability everywhere).", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
