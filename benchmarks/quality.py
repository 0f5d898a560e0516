"""The per-case quality flag (autoseg.quality) on synthetic leaderboard tasks and on deliberately shifted inputs.

    python benchmarks/quality.py [--tasks ct-aniso,mri-nested,mr-2ch] [--steps 300] [--folds 3] [--cases 10]
                                 [--out benchmarks/results/quality.md]

Per task: generate it (size tiny), plan with ``--folds`` folds, train every fold of the planned 3D configuration
(or the first planned one) for a fixed number of steps (the out-of-fold cases calibrate the flag at selection),
then predict with the bundle: the task's test cases plus the training cases of a second draw (another seed) as
"normal" cases, and each of them shifted:

- ``flipped``: the array reversed along its first two axes, header unchanged (a wrong orientation on import);
- ``mirrored``: the array reversed along its last axis (left-right in the usual array order), header unchanged
  (sides swapped on import; a task with sided anatomy, kidneys-lr, shows what the position check makes of it);
- ``spacing3x``: the header's spacing times 3, array unchanged;
- ``noise``: Gaussian noise with sd half the image's 1st-99th percentile range;
- ``other-modality``: intensities mapped to another modality's range (CT -> 0..1000 as an MR; MR -> -1000..1000
  as a CT), so the anatomy is unchanged but the values are not;
- for a CT task, ``real-MR``: the test images of the MR task (another anatomy; no reference).

Reported: the share of normal and of shifted cases flagged, each shift's Dice, and the Spearman rank correlation
of the score with the Dice over every case that has a reference; and the out-of-fold calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from autoseg.bundle import pack_bundle
from autoseg.io import Geometry, read_images, read_label, write_image
from autoseg.metrics import dice_per_class
from autoseg.predict import predict
from autoseg.quality import Envelope, calibrate
from autoseg.select import select_model
from autoseg.synth import generate
from autoseg.workdir import Workdir
from autoseg.workflow import plan_dataset, train_dataset

ROOT = Path(__file__).resolve().parent
SHIFTS = ("flipped", "mirrored", "spacing3x", "noise", "other-modality")


def shifted(kind: str, image: np.ndarray, geometry: Geometry, ct: bool, rng: np.random.Generator
            ) -> tuple[np.ndarray, Geometry]:
    """``image`` ``(C, *spatial)`` with one deliberate shift."""
    if kind == "flipped":
        return image[:, ::-1, ::-1].copy(), geometry
    if kind == "mirrored":
        return image[..., ::-1].copy(), geometry
    if kind == "spacing3x":
        return image, Geometry(tuple(3 * s for s in geometry.spacing), geometry.origin, geometry.direction)
    lo, hi = np.percentile(image, [1, 99], axis=tuple(range(1, image.ndim)), keepdims=True)
    if kind == "noise":
        return (image + rng.normal(0, 1, image.shape) * (hi - lo) / 2).astype(np.float32), geometry
    if kind == "other-modality":
        unit = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
        return (unit * 1000 if ct else unit * 2000 - 1000).astype(np.float32), geometry
    raise ValueError(kind)


def write_case(folder: Path, case: str, image: np.ndarray, geometry: Geometry) -> None:
    for c in range(image.shape[0]):
        write_image(image[c], geometry, folder / f"{case}_{c:04d}.nii.gz")


def run_task(task: str, root: Path, steps: int, folds: int, cases: int, extra_cases: int,
             mr_test: Path | None, train: bool = True) -> dict:
    t0 = time.perf_counter()
    ds = generate(task, root / "data" / task, cases=cases, size="tiny", seed=0)
    extra = generate(task, root / "data" / f"{task}-seed1", cases=extra_cases, size="tiny", seed=1)
    work = root / "work" / task
    if train:
        plan_dataset(ds, work, budget="2m", device="cpu", jobs=1, folds=folds)
    plans = Workdir(work).load_plans()
    config = "3d_fullres" if "3d_fullres" in plans.configurations else plans.train_runs[0]["configuration"]
    if train:
        trained = train_dataset(ds, work, configuration=config, fold="all", steps=steps, workers=0, device="cpu",
                                progress=False)
        if trained.selection is None or trained.bundle is None:
            raise RuntimeError(f"{task}: {trained.selection_error or trained.bundle_error}")
        selection, bundle = trained.selection, trained.bundle
    else:  # the folds trained so far (a run stopped early to fit the time): select and bundle them
        selection, bundle = select_model(work, ds), pack_bundle(work)
        folds = len(Workdir(work).trained_folds(config))
    quality = selection.quality
    ct = plans.channel_names[0].upper().startswith("CT")
    train_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    inputs, refs = root / "inputs" / task, {}
    shutil.rmtree(inputs, ignore_errors=True)
    normal = [(f"ts-{p.name[:-len('_0000.nii.gz')]}", ds / "imagesTs", ds / "labelsTs")
              for p in sorted((ds / "imagesTs").glob("*_0000.nii.gz"))]
    normal += [(f"x-{p.name[:-len('_0000.nii.gz')]}", extra / "imagesTr", extra / "labelsTr")
               for p in sorted((extra / "imagesTr").glob("*_0000.nii.gz"))]
    for name, images_dir, labels_dir in normal:
        cid = name.split("-", 1)[1]
        files = sorted(images_dir.glob(f"{cid}_[0-9][0-9][0-9][0-9].nii.gz"))
        image, geometry = read_images(files)
        ref, _ = read_label(labels_dir / f"{cid}.nii.gz")
        write_case(inputs, f"normal-{name}", image, geometry)
        refs[f"normal-{name}"] = ref
        for kind in SHIFTS:
            img, geo = shifted(kind, image, geometry, ct, rng)
            write_case(inputs, f"{kind}-{name}", img, geo)
            refs[f"{kind}-{name}"] = ref[::-1, ::-1].copy() if kind == "flipped" else ref
    if ct and mr_test is not None:
        for p in sorted(mr_test.glob("*_0000.nii.gz")):
            image, geometry = read_images([p])
            if image.shape[0] == plans.in_channels:
                write_case(inputs, f"real-MR-{p.name[:-len('_0000.nii.gz')]}", image, geometry)
    t1 = time.perf_counter()
    out = root / "predictions" / task
    shutil.rmtree(out, ignore_errors=True)
    summary = predict(bundle, inputs, out, device="cpu", progress=False, mirror="off")
    predict_s = time.perf_counter() - t1
    names = plans.scored_classes
    rows = {}
    for case, q in summary.quality.items():
        dice = None
        if case in refs:
            seg, _ = read_label(out / f"{case}.nii.gz")
            values = [v for v in dice_per_class(seg, refs[case], list(names), plans.ignore_label).values()
                      if v is not None and not np.isnan(v)]
            dice = float(np.mean(values)) if values else None
        rows[case] = {"kind": case.split("-ts-")[0].split("-x-")[0] if not case.startswith("real-MR") else "real-MR",
                      "score": q.score, "flagged": q.flagged, "dice": dice,
                      "reasons": [r.split(":")[0] for r in q.reasons]}
    return {"task": task, "config": config, "steps": steps, "folds": folds, "cases": cases,
            "train_s": train_s, "predict_s": predict_s, "quality": quality, "rows": rows}


def spearman(x: list[float], y: list[float]) -> float | None:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0]) if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0 else None


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def recalibrate(r: dict) -> None:
    """Apply this checkout's :func:`autoseg.quality.calibrate` to a task's stored out-of-fold (score, Dice) pairs
    and re-derive each case's flag from its stored score and non-score reasons (what ``assess`` does), so a
    result run with an earlier calibration rule is reported under the current one (the run's flag is kept as
    ``flagged_run``)."""
    q = r["quality"]
    pairs = q["calibration"].get("cases_score_dice") or {}
    if not pairs or r.get("recalibrated"):
        return
    new = calibrate([v[0] for v in pairs.values()], [v[1] for v in pairs.values()], Envelope(**q["envelope"]),
                    min_dice=q["min_dice"])
    r["run_threshold"], r["recalibrated"] = q["threshold"], True
    r["quality"] = {**q, "threshold": new.threshold, "calibration": new.calibration}
    for x in r["rows"].values():
        other = [reason for reason in x["reasons"] if not reason.startswith("score")]
        x["flagged_run"] = x["flagged"]
        x["reasons"] = (["score"] if x["score"] < new.threshold else []) + other
        x["flagged"] = bool(x["reasons"])


def report(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    for r in results:
        recalibrate(r)
    load = os.getloadavg()
    lines = ["# Quality flag: shifted inputs flagged, normal cases not, score against Dice",
             "", f"Written by `python benchmarks/quality.py {' '.join(sys.argv[1:])}` in {seconds / 60:.0f} min. "
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average at the "
             f"end {load[0]:.1f}: training ran a fixed number of steps, so load changes the times, not the "
             "models); device cpu.",
             "", "Each task: size `tiny`, every fold of the planned 3D configuration trained a fixed number of steps "
             "(each task's section says how many, and the out-of-fold median Dice they reached), the flag calibrated on the out-of-fold cases with the default "
             "`--min-dice` (their median Dice - 0.05). Normal cases: the task's test cases and the training cases "
             "of a second draw (seed 1). Shifts (see the script's docstring): flipped (array reversed on two axes, header kept), "
             "mirrored (the last axis reversed, header kept; in the runs that have it), spacing3x (header), noise (sd half the 1-99 % range), other-modality (CT values mapped to 0..1000, "
             "MR to -1000..1000), and for the CT task the MR task's real test images (real-MR).", ""]
    lines += ["## Summary", "", "| task | OOF cases | OOF Spearman(score, Dice) | OOF worst flagged | min Dice | "
              "normal flagged | shifted flagged | Spearman(score, Dice), all cases with a reference |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["quality"]["calibration"]
        rows = r["rows"].values()
        normal = [x for x in rows if x["kind"] == "normal"]
        shifted_ = [x for x in rows if x["kind"] != "normal"]
        with_ref = [x for x in rows if x["dice"] is not None]
        rho = spearman([x["score"] for x in with_ref], [x["dice"] for x in with_ref])
        lines.append(f"| {r['task']} | {c['cases']} | {_f(c['spearman_score_dice'], '.2f')} | "
                     f"{c['worst_flagged']} of {c['worst_cases']} | {r['quality']['min_dice']:.3f} | "
                     f"{sum(x['flagged'] for x in normal)} of {len(normal)} | "
                     f"{sum(x['flagged'] for x in shifted_)} of {len(shifted_)} | {_f(rho, '.2f')} |")
    for r in results:
        c = r["quality"]["calibration"]
        lines += ["", f"## {r['task']}", "",
                  f"{r['cases']} training cases; configuration {r['config']}, {r['folds']} folds x {r['steps']} "
                  "steps; plan+train+select "
                  f"{r['train_s']:.0f} s, predict {len(r['rows'])} cases {r['predict_s']:.0f} s. Out-of-fold: "
                  f"{c['cases']} cases, median Dice {_f(c.get('median_dice'))}, threshold {r['quality']['threshold']:.3f} "
                  f"for Dice {r['quality']['min_dice']:.3f} ({c['rule']}); {c['below_min_dice']} below it, "
                  f"{c['flagged_below_min_dice']} of them flagged, {c['flagged_above_min_dice']} others flagged"
                  + (f" (at run time the first rule, unconstrained Youden's J, set {r['run_threshold']:.3f}; "
                     f"flags below use the committed rule, re-derived from the stored scores and checks; "
                     f"{sum(x['flagged_run'] for x in r['rows'].values())} of {len(r['rows'])} cases were flagged "
                     "at run time)" if r.get("recalibrated") and r["run_threshold"] != r["quality"]["threshold"]
                     else "") + ".", "",
                  "| inputs | cases | flagged | mean Dice | mean score | why flagged (checks failing, cases) |",
                  "|---|---|---|---|---|---|"]
        kinds = ["normal", *SHIFTS, "real-MR"]
        for kind in kinds:
            xs = [x for x in r["rows"].values() if x["kind"] == kind]
            if not xs:
                continue
            dices = [x["dice"] for x in xs if x["dice"] is not None]
            why: dict[str, int] = {}
            for x in xs:
                for reason in x["reasons"]:
                    key = "score" if reason.startswith("score") else "folds" if reason.startswith("folds") else reason
                    why[key] = why.get(key, 0) + 1
            lines.append(f"| {kind} | {len(xs)} | {sum(x['flagged'] for x in xs)} | "
                         f"{_f(float(np.mean(dices)) if dices else None)} | {np.mean([x['score'] for x in xs]):.3f} | "
                         + (", ".join(f"{k} {v}" for k, v in sorted(why.items())) or "-") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="ct-aniso,mri-nested,mr-2ch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--extra", type=int, default=6, help="normal cases drawn with another seed, besides the test cases")
    ap.add_argument("--root", type=Path, default=Path("/tmp/autoseg_quality_bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quality.md")
    ap.add_argument("--no-train", action="store_true",
                    help="use the folds already trained in ROOT/work/TASK (select, bundle, predict)")
    ap.add_argument("--render", default=None, metavar="A.json,B.json",
                    help="only write the report from the results.json of earlier runs (tasks run separately)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.render:
        results = [r for f in args.render.split(",") for r in json.loads(Path(f).read_text())]
        args.out.write_text(report(results, args, sum(r["train_s"] + r["predict_s"] for r in results)))
        return
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    mr_test = None
    if any(t.startswith("ct") for t in tasks):  # a CT task is also given the MR task's real images
        mr_test = generate("mri-nested", args.root / "data" / "mr-for-ct", cases=1, size="tiny", seed=2) / "imagesTs"
    results = []
    for task in tasks:
        print(f"{task} ...", flush=True)
        results.append(run_task(task, args.root, args.steps, args.folds, args.cases, args.extra, mr_test,
                                train=not args.no_train))
        (args.root / "results.json").write_text(json.dumps(results, indent=1, default=str))
        args.out.write_text(report(results, args, time.perf_counter() - t0))
        print(f"{task} done; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
