"""Instances on touching nuclei at an equal wall-clock budget: U-Net + connected components, U-Net + the
touching-object formulation (interior output + seeded watershed) and Mask R-CNN.

    python benchmarks/instances.py [--size small] [--budget 5m] [--steps N] [--work /tmp/instances_bench]

``autoseg synth nuclei`` (seed 0) is planned once for ``--budget`` (the planner chooses the touching-object
formulation: most nuclei touch another; with torchvision installed it also offers ``2d_maskrcnn``). Fold 0 is
then trained three times from the same plans.json, each for ``--budget`` of wall-clock time (or ``--steps``
steps each, where given): the 2d configuration as planned (``watershed``), the same with the interior output
removed (``components``: connected components of each class), and the ``2d_maskrcnn`` configuration (its
detections, mask-voted). The test cases (imagesTs) are predicted through ``autoseg predict``'s engine with
instances, and scored against instancesTs with :mod:`autoseg.lesionwise` (one-to-one matching at IoU > 0.5):
instance F1 and panoptic quality per class, pooled over the test cases. Also time per training step and per
predicted image.

Writes benchmarks/results/instance_methods.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from autoseg.benchmark.measure import machine  # noqa: E402
from autoseg.inference import Predictor  # noqa: E402
from autoseg.io import read_label  # noqa: E402
from autoseg.lesionwise import case_lesionwise, pooled  # noqa: E402
from autoseg.plan.budget import parse_duration  # noqa: E402
from autoseg.preprocess import preprocess  # noqa: E402
from autoseg.synth import generate  # noqa: E402
from autoseg.train import Trainer  # noqa: E402
from autoseg.workdir import Workdir  # noqa: E402
from autoseg.workflow import plan_dataset  # noqa: E402

CONFIG = "2d"
MASKRCNN = "2d_maskrcnn"
METHODS = {"U-Net + connected components": (CONFIG, "components"),
           "U-Net + interior + watershed": (CONFIG, "watershed"),
           "Mask R-CNN": (MASKRCNN, "detections")}


def as_method(plans, config: str, method: str):
    """The plan with its 2d configuration making instances by ``method`` (Mask R-CNN's: as planned)."""
    if config == CONFIG:
        cfg = plans.configurations[CONFIG]
        plans.configurations[CONFIG] = replace(
            cfg, instances=replace(cfg.instances, method=method),
            network=replace(cfg.network, instance_outputs=int(method == "watershed")))
    return plans


def score(ds: Path, pred: Path, classes: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per class (and all nuclei pooled): instance F1 and PQ over the test cases, pooled counts."""
    counts: dict[str, list] = {name: [] for name in classes}
    ending = ".png"
    for ref_file in sorted((ds / "labelsTs").glob(f"*{ending}")):
        ref, _ = read_label(ref_file)
        ref_inst, _ = read_label(ds / "instancesTs" / ref_file.name)
        seg, _ = read_label(pred / ref_file.name)
        inst, _ = read_label(pred / "instances" / ref_file.name)
        for name, modes in case_lesionwise(ref, seg, classes, ref_inst, inst, modes=("iou",)).items():
            counts[name].append(modes["iou"].counts())
    out = {name: pooled(c).scores() for name, c in counts.items()}
    out["all nuclei"] = pooled(x for c in counts.values() for x in c).scores()
    return out


def run_method(ds: Path, base: Path, work: Path, config: str, method: str, steps: int | None,
               seconds: float) -> dict:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, ignore=shutil.ignore_patterns("runs", "selection.json", "model.autoseg"))
    w = Workdir(work)
    plans = as_method(w.load_plans(), config, method)
    w.save_plans(plans)
    preprocess(ds, work, plans, w.load_fingerprint(), configurations=[config], jobs=2)  # an offered config: not yet
    t0 = time.perf_counter()
    result = Trainer(work, config, 0, steps=steps, seconds=seconds, progress=False).fit()
    train_s = time.perf_counter() - t0
    pred = work / "pred"
    predictor = Predictor.from_workdir(work, config, folds=[0], mirror="off", instances=True)
    t0 = time.perf_counter()
    summary = predictor.predict_files(ds / "imagesTs", pred)
    predict_s = time.perf_counter() - t0
    classes = {name: value for value, name in predictor.instance_classes.items()}
    return {"steps": result.steps, "train_s": train_s, "s_per_step": result.seconds / max(result.steps, 1),
            "s_per_image": predict_s / max(summary.cases, 1), "images": summary.cases,
            "instances": summary.instances, "scores": score(ds, pred, classes)}


def fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def report(results: dict[str, dict], args: argparse.Namespace, plan_note: str, out: Path) -> None:
    names = list(next(iter(results.values()))["scores"])
    lines = [
        "# Instances on touching nuclei: connected components, the touching-object formulation, Mask R-CNN",
        "",
        f"`python benchmarks/instances.py --size {args.size} --budget {args.budget}"
        f"{f' --steps {args.steps}' if args.steps else ''}` "
        f"on {', '.join(f'{k} {v}' for k, v in machine().items())}; load average (1 min) at the start "
        f"{os.getloadavg()[0]:.1f}. "
        + ("Equal steps per method." if args.steps else f"Equal wall-clock budget per method: {args.budget} of training."),
        "",
        f"Data: `autoseg synth nuclei --size {args.size}` (seed 0), test cases from imagesTs scored against "
        "instancesTs. One plan (`autoseg plan`'s rules), fold 0 trained per method (the 2d configuration with or "
        "without the interior output; the 2d_maskrcnn configuration). Matching one-to-one at IoU > 0.5 (`autoseg.lesionwise`); F1 and PQ pooled over "
        "the test cases.",
        "",
        f"Plan: {plan_note}",
        "",
        "| method | " + " | ".join(f"{n} F1 | {n} PQ" for n in names) + " | steps | s / step | s / image |",
        "|---|" + "---|---|" * len(names) + "---|---|---|",
    ]
    for method, r in results.items():
        cells = " | ".join(f"{fmt(r['scores'][n]['f1'])} | {fmt(r['scores'][n]['pq'])}" for n in names)
        lines.append(f"| {method} | {cells} | {r['steps']} | {r['s_per_step']:.2f} | {r['s_per_image']:.2f} |")
    lines.append("")
    best = max(results.values(), key=lambda r: r["scores"]["all nuclei"]["pq"] or 0)
    cc = results["U-Net + connected components"]["scores"]["all nuclei"]["pq"] or 0
    lines.append(f"All nuclei PQ: best {fmt(best['scores']['all nuclei']['pq'])} vs connected components {fmt(cc)} "
                 f"({(best['scores']['all nuclei']['pq'] or 0) - cc:+.3f}).")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per method instead of the wall-clock budget")
    ap.add_argument("--work", type=Path, default=Path("/tmp/instances_bench"))
    ap.add_argument("--only", default=None, help="run only these methods (comma-separated: components, "
                    "watershed, detections); the others' results are read back from WORK/results.json")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "instance_methods.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ds = generate("nuclei", args.work / "Dataset950_Nuclei", size=args.size, seed=0)
    base = args.work / "plan"
    result = plan_dataset(ds, base, budget=args.budget, device="cpu", jobs=min(2, os.cpu_count() or 1))
    cfg = result.plans.configurations[CONFIG]
    steps = args.steps
    seconds = parse_duration(args.budget)
    notes = [n for n in result.plans.notes if n.startswith("instances:")]
    plan_note = (f"{notes[0] if notes else 'no instance note'}; 2d patch {cfg.patch_size}, batch {cfg.batch_size}, "
                 f"features {cfg.network.features}; planned {cfg.schedule.steps} steps for {args.budget}"
                 + (f"; 2d_maskrcnn patch {result.plans.configurations[MASKRCNN].patch_size}, batch "
                    f"{result.plans.configurations[MASKRCNN].batch_size}, planned "
                    f"{result.plans.configurations[MASKRCNN].schedule.steps} steps"
                    if MASKRCNN in result.plans.configurations else "; no 2d_maskrcnn (torchvision missing)") + ".")
    print(plan_note, flush=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name, (config, method) in METHODS.items():
        if config not in result.plans.configurations or (args.only and method not in args.only.split(",")):
            continue
        results[name] = run_method(ds, base, args.work / method, config, method, steps, seconds)
        store.write_text(json.dumps(results))
        print(name, results[name], flush=True)
    results = {name: results[name] for name in METHODS if name in results}
    report(results, args, plan_note, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
