"""Prediction speed, autoseg vs nnU-Net, on the same data with a network of the same size (issue 5, Performance).

    python benchmarks/predict.py [--train-s 150] [--cases 3] [--tta-cases 2] [--train-cases 10]

Target: ``autoseg predict`` at <= 0.25x the time of ``nnUNetv2_predict`` at equal Dice (within 0.005).

1. Data: ``autoseg synth ct-aniso --size bench --cases N`` (anisotropic CT-like volumes of ~48x128x128 with
   varying spacing); the first ``--cases`` test cases are predicted (made once under benchmarks/work/predict/).
2. nnU-Net: ``nnUNetv2_plan_and_preprocess -c 3d_fullres``; fold 0 trained for ``--train-s`` seconds with
   ``nnUNetTrainer_Budget`` of benchmarks/nnunet_runner.py, here subclassed as ``nnUNetTrainer_BudgetNoVal``
   (nnU-Net's final validation of fold 0 skipped: it predicts with mirroring and is not measured here),
   installed into the nnU-Net venv at run time.
3. autoseg: plans.json for ``3d_fullres`` written from autoseg's fingerprint and rules with nnU-Net's plan:
   the same spacing, patch, batch and network (stages, features, kernels, strides, convs per stage, deep
   supervision; parameter counts reported), bf16 autocast + channels-last (see :func:`autoseg_workdir`), then
   ``autoseg train --config 3d_fullres --fold 0`` for ``--train-s`` seconds.
4. Predictions, interleaved in one run, every command measured as a process tree (wall, CPU, peak PSS):
   nnU-Net ``nnUNetv2_predict -f 0 -chk checkpoint_final.pth -npp 2 -nps 2`` with ``--disable_tta`` and
   without; ``autoseg predict WORK IN OUT --folds 0 --mirror off`` and ``--mirror on`` (its fast path: the
   plan's precision and layout, batched tiles, float16 probabilities); and autoseg's exact path on the same
   weights (fp32, NCDHW, float32 probabilities: a copy of the workdir whose plans say fp32, predicted through
   :func:`autoseg.predict.predict` with ``storage="float32"``), and the fast path with float32 probabilities,
   mirroring off. Without TTA on ``--cases`` cases and on the first alone (their difference gives the time per
   case without the start-up: imports, loading); with TTA on ``--tta-cases`` (nnU-Net's TTA costs minutes a
   case here), its start-up taken from the same tool's runs without TTA.
5. Dice of every output against labelsTs (``autoseg.evaluate``). The two tools' networks were trained
   differently, so their Dice are reported side by side; the "equal Dice within 0.005" check that can be
   made honestly is autoseg's fast path against its exact fp32 path on the same weights.

Writes the section "Speed: autoseg predict vs nnUNetv2_predict" of benchmarks/results/predict.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import _nnunet  # noqa: E402
import nnunet_runner  # noqa: E402  (its budget trainer; another benchmark's module)
from predict_memory import update_results  # noqa: E402

from autoseg.benchmark.measure import machine, measure  # noqa: E402

WORK = BENCH / "work" / "predict"
SECTION = "Speed: autoseg predict vs nnUNetv2_predict"
TARGET = 0.25
STEP_S = 10.0  # prior seconds per training step at nnU-Net's network on 2 busy cores (no planner measured it)
DID = nnunet_runner.DATASET_ID
TRAINER = "nnUNetTrainer_BudgetNoVal"
TRAINER_CODE = f'''"""Written by autoseg's benchmarks/predict.py: the budget trainer without the final validation."""
from nnunetv2.training.nnUNetTrainer.variants.training_length.{nnunet_runner.TRAINER} import {nnunet_runner.TRAINER}


class {TRAINER}({nnunet_runner.TRAINER}):
    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (benchmarks/predict.py measures prediction itself)")
'''


def sh(cmd: list[str], env: dict | None = None, log: Path | None = None) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    m = measure([str(c) for c in cmd], env=env, log=log)
    if m.returncode:
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise SystemExit(f"failed ({m.returncode}): {' '.join(map(str, cmd))}\n{tail}")


def dataset(train_cases: int, cases: int) -> tuple[Path, Path]:
    from autoseg.synth import generate

    ds = WORK / "Dataset990_CTAniso"
    if not (ds / "dataset.json").is_file():
        generate("ct-aniso", ds, size="bench", cases=train_cases, seed=0)
    inputs = WORK / f"imagesTs_{cases}"
    if not inputs.is_dir():
        inputs.mkdir(parents=True)
        for p in sorted((ds / "imagesTs").iterdir())[:cases]:
            shutil.copy2(p, inputs / p.name)
    one = WORK / "imagesTs_1"
    if not one.is_dir():
        one.mkdir(parents=True)
        first = sorted(inputs.iterdir())[0]
        shutil.copy2(first, one / first.name)
    return ds, inputs


def nnunet(ds: Path, train_s: float, env: dict) -> tuple[_nnunet.Workspace, dict]:
    ws = _nnunet.Workspace(WORK / "nnunet")
    for folder in (ws.raw, ws.preprocessed, ws.results):
        folder.mkdir(parents=True, exist_ok=True)
    nnunet_runner.install_trainer()
    (nnunet_runner.install_trainer().parent / f"{TRAINER}.py").write_text(TRAINER_CODE)
    ws.add_dataset(ds, DID, "CTAniso")
    folder = next(iter(ws.preprocessed.glob(f"Dataset{DID:03d}_*")), None)
    cases = len(list((ds / "labelsTr").glob("*.nii.gz")))
    if folder is None or len(list((folder / "nnUNetPlans_3d_fullres").glob("*.pkl"))) != cases:
        sh(ws.command("nnUNetv2_plan_and_preprocess", "-d", str(DID), "-c", "3d_fullres", "-np", "2", "-npfp", "2",
                      "--no_pbar"), env=ws.env(**env), log=WORK / "nnunet_plan.log")
        (folder,) = ws.preprocessed.glob(f"Dataset{DID:03d}_*")
    nnunet_runner.write_small_split(ws, ds)
    checkpoint = next(ws.results.glob(f"Dataset{DID:03d}_*/{TRAINER}__nnUNetPlans__3d_fullres/fold_0/"
                                      "checkpoint_final.pth"), None)
    if checkpoint is None:
        sh(ws.command("nnUNetv2_train", str(DID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"),
           env=ws.env(NNUNET_BUDGET_S=str(train_s), **env), log=WORK / "nnunet_train.log")
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    return ws, {**plans["configurations"]["3d_fullres"], "transpose_forward": plans["transpose_forward"]}


def autoseg_workdir(ds: Path, nn: dict, train_s: float, env: dict) -> Path:
    """autoseg's plans.json for 3d_fullres with nnU-Net's spacing, patch, batch and network; fold 0 trained.

    Written from autoseg's rules (normalization, resampling) and fingerprint, not by ``autoseg plan``: on this
    dataset the planner profiles a candidate whose bottleneck is 1x1x1, which instance norm refuses (an
    issue of the planner, reported). Precision and layout are set to what the planner chooses on this CPU
    (bf16 autocast + channels-last; benchmarks/results/train.md measures that choice)."""
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.plan import rules
    from autoseg.schema.fingerprint import Fingerprint
    from autoseg.schema.plans import Augmentation, Configuration, Measurement, Network, Plans
    from autoseg.workdir import FINGERPRINT_FILE, PLANS_FILE

    work = WORK / "autoseg"
    exe = str(Path(sys.executable).parent / "autoseg")
    if not (work / FINGERPRINT_FILE).is_file():
        work.mkdir(parents=True, exist_ok=True)
        extract_fingerprint(ds, jobs=2).save(work / FINGERPRINT_FILE)
    fp = Fingerprint.load(work / FINGERPRINT_FILE)
    order = list(range(fp.ndim))
    if list(nn["transpose_forward"]) != order:
        raise SystemExit(f"nnU-Net's axis order {nn['transpose_forward']} is not the files' {order}: spacing and "
                         "patch would not mean the same axes")
    arch = nn["architecture"]["arch_kwargs"]
    net = Network("unet", list(arch["features_per_stage"]), [list(k) for k in arch["kernel_sizes"]],
                  [list(s) for s in arch["strides"]], list(arch["n_conv_per_stage"]),
                  decoder_convs=int(arch["n_conv_per_stage_decoder"][0]), deep_supervision=True)
    spacing = [float(s) for s in nn["spacing"]]
    cfg = Configuration(name="3d_fullres", ndim=3, spacing=spacing,
                        median_shape=[int(v) for v in nn["median_image_size_in_voxels"]],
                        patch_size=list(nn["patch_size"]), batch_size=int(nn["batch_size"]),
                        normalization=rules.normalization(fp), resampling=rules.resampling(spacing), network=net,
                        augmentation=Augmentation(mirror_axes=[0, 1, 2]), precision="bf16", channels_last=True,
                        measured=Measurement(step_time_s=STEP_S))  # a prior: the trainer re-fits it after 30 steps
    plans = Plans(fp.dataset_name, fp.dataset_hash, "benchmarks/predict.py: nnU-Net's 3d_fullres", {"type": "cpu"},
                  train_s, {"3d_fullres": cfg}, axis_order=order, channel_names=fp.channel_names, labels=fp.labels,
                  file_ending=fp.file_ending, folds=5,
                  train_runs=[{"configuration": "3d_fullres", "fold": 0, "seconds": train_s}])
    if not (work / PLANS_FILE).is_file() or Plans.load(work / PLANS_FILE).configurations != plans.configurations:
        plans.save(work / PLANS_FILE)
    if not (work / "runs" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file():
        sh([exe, "train", str(ds), "-w", str(work), "--config", "3d_fullres", "--fold", "0",
            "--budget", f"{int(train_s)}s", "-q"], env=env, log=WORK / "autoseg_train.log")
    return work


def exact_copy(work: Path) -> Path:
    """The same weights with plans that say fp32 and NCDHW (runs/ linked, not copied)."""
    from dataclasses import replace

    from autoseg.schema.plans import Plans
    from autoseg.workdir import PLANS_FILE

    exact = WORK / "autoseg_exact"
    exact.mkdir(exist_ok=True)
    plans = Plans.load(work / PLANS_FILE)
    cfg = replace(plans.configurations["3d_fullres"], precision="fp32", channels_last=False)
    replace(plans, configurations={"3d_fullres": cfg}).save(exact / PLANS_FILE)
    for name in ("runs", "fingerprint.json", "selection.json"):  # the same post-processing rules too
        if (work / name).exists() and not (exact / name).exists():
            (exact / name).symlink_to(work / name)
    return exact


def param_counts(work: Path, ws: _nnunet.Workspace) -> tuple[int, int]:
    import torch

    state = torch.load(work / "runs/3d_fullres/fold_0/checkpoint_final.pt", map_location="cpu", weights_only=True)
    ours = sum(v.numel() for k, v in state["model"].items() if torch.is_floating_point(v))
    ck = next(ws.results.glob(f"Dataset{DID:03d}_*/{TRAINER}__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"))
    # nnU-Net's state_dict names a tensor several times (decoder.encoder.*, all_modules.*): count storages once
    code = ("import sys, torch; ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
            "seen = {v.data_ptr(): v.numel() for v in ck['network_weights'].values() if torch.is_floating_point(v)}; "
            "print(sum(seen.values()))")
    theirs = int(subprocess.run([str(_nnunet.venv_bin() / "python"), "-c", code, str(ck)], check=True,
                                capture_output=True, text=True).stdout.strip())
    return ours, theirs


def dice(pred: Path, ds: Path) -> float:
    """Foreground mean Dice of the predicted cases (their references copied beside, the others left out)."""
    from autoseg.evaluate import evaluate_folder

    refs = WORK / f"labelsTs_{pred.name}"
    shutil.rmtree(refs, ignore_errors=True)
    refs.mkdir(parents=True)
    for p in pred.glob("*.nii.gz"):
        shutil.copy2(ds / "labelsTs" / p.name, refs / p.name)
    r = evaluate_folder(pred, refs, ds / "dataset.json", jobs=1)
    return float(r["summary"]["foreground_mean"]["dice"])


def label_difference(a: Path, b: Path) -> float:
    """Fraction of voxels whose label differs between two folders of predictions (same file names)."""
    import numpy as np

    from autoseg.io import read_label

    differ = total = 0
    for p in sorted(a.glob("*.nii.gz")):
        x, y = read_label(p)[0], read_label(b / p.name)[0]
        differ, total = differ + int(np.count_nonzero(x != y)), total + x.size
    return differ / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-s", type=float, default=150, help="training seconds per tool (default %(default)s)")
    p.add_argument("--cases", type=int, default=3, help="test cases predicted without TTA (default %(default)s)")
    p.add_argument("--tta-cases", type=int, default=2, help="test cases predicted with TTA (default %(default)s)")
    p.add_argument("--train-cases", type=int, default=10, help="training cases generated (default %(default)s)")
    p.add_argument("--work", type=Path, default=WORK, help="work folder, reused between runs (default %(default)s)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    globals()["WORK"] = a.work.resolve()
    if not (_nnunet.venv_bin() / "nnUNetv2_predict").exists():
        raise SystemExit(f"nnU-Net is not installed in {_nnunet.VENV} (benchmarks/_nnunet.ensure_venv() makes it)")
    WORK.mkdir(parents=True, exist_ok=True)
    env = {"OMP_WAIT_POLICY": "PASSIVE", "nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "2"}
    ds, inputs = dataset(a.train_cases, a.cases)
    dataset(a.train_cases, a.tta_cases)
    ws, nn = nnunet(ds, a.train_s, env)
    work = autoseg_workdir(ds, nn, a.train_s, {**os.environ, **env})
    exact = exact_copy(work)
    from autoseg.schema.plans import Plans
    from autoseg.workdir import PLANS_FILE

    cfg = Plans.load(work / PLANS_FILE).configurations["3d_fullres"]
    ours, theirs = param_counts(work, ws)
    exe = str(Path(sys.executable).parent / "autoseg")
    code = ("import sys; from autoseg.predict import predict; predict(sys.argv[1], sys.argv[2], sys.argv[3], "
            "folds=[0], mirror='off', storage='float32', progress=False)")

    def nn_cmd(inp: Path, out: Path, tta: bool) -> tuple[list[str], dict]:
        cmd = ws.command("nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(DID), "-c", "3d_fullres",
                         "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "2",
                         "-nps", "2", "--disable_progress_bar", *([] if tta else ["--disable_tta"]))
        return cmd, ws.env(**env)

    def as_cmd(inp: Path, out: Path, tta: bool) -> tuple[list[str], dict]:
        return ([exe, "predict", str(work), str(inp), str(out), "--folds", "0", "--mirror", "on" if tta else "off",
                 "-q"], {**os.environ, **env})

    def exact_cmd(inp: Path, out: Path, tta: bool) -> tuple[list[str], dict]:
        return [sys.executable, "-c", code, str(exact), str(inp), str(out)], {**os.environ, **env}

    def storage_cmd(inp: Path, out: Path, tta: bool) -> tuple[list[str], dict]:
        return [sys.executable, "-c", code, str(work), str(inp), str(out)], {**os.environ, **env}

    variants = [("nnU-Net", False, nn_cmd), ("autoseg", False, as_cmd), ("autoseg exact fp32", False, exact_cmd),
                ("autoseg float32 probabilities", False, storage_cmd), ("nnU-Net", True, nn_cmd),
                ("autoseg", True, as_cmd)]
    results = {}
    for name, tta, make in variants:
        key = f"{name}, TTA {'on' if tta else 'off'}"
        slug = key.replace(" ", "_").replace(",", "")
        runs = {}
        sizes = ((a.tta_cases, WORK / f"imagesTs_{a.tta_cases}"),) if tta else ((a.cases, inputs), (1, WORK / "imagesTs_1"))
        for n, inp in sizes:
            out = WORK / "out" / f"{slug}_{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd, env_ = make(inp, out, tta)
            load = os.getloadavg()[0]
            m = measure(cmd, env=env_, log=WORK / f"{slug}_{n}.log")
            if m.returncode:
                raise SystemExit(f"{key} failed; see {WORK / f'{slug}_{n}.log'}")
            runs[n] = (m, load, out)
            print(f"{key}, {n} case(s): {m.wall_s:.1f}s, peak PSS {m.peak_pss_mb:.0f} MB, load {load:.1f}", flush=True)
        n = sizes[0][0]
        results[key] = {"n": n, "all": runs[n][0], "one": runs[1][0] if 1 in runs else None,
                        "load": [r[1] for r in runs.values()], "dice": dice(runs[n][2], ds), "out": runs[n][2]}
    text = report(results, a, nn, cfg, ours, theirs)
    print(text)
    if not a.no_write:
        update_results(text, SECTION)
    return 0


def report(results: dict, a: argparse.Namespace, nn: dict, cfg, ours: int, theirs: int) -> str:
    def startup(key: str) -> float:
        """Seconds of a run that do not grow with the cases (imports, loading): T1 - (Tn - T1) / (n - 1), from
        the tool's runs without TTA (start-up does not depend on it)."""
        r = results[key.replace("TTA on", "TTA off")]
        return r["one"].wall_s - (r["all"].wall_s - r["one"].wall_s) / max(r["n"] - 1, 1)

    def per_case(r: dict, key: str) -> tuple[float, float]:
        return r["all"].wall_s / r["n"], (r["all"].wall_s - startup(key)) / r["n"]

    arch = nn["architecture"]["arch_kwargs"]
    lines = [f"## {SECTION}", "",
             "Generated by `benchmarks/predict.py`: `autoseg synth ct-aniso --size bench` "
             f"({a.train_cases} training cases), the first {a.cases} test cases predicted without TTA and the first "
             f"{a.tta_cases} with it, each tool's TTA-off runs also on the first case alone (the start-up, "
             "T1 - (Tn - T1) / (n - 1), is taken from them for both settings); fold 0 of each tool trained "
             f"for {a.train_s:.0f} s (nnU-Net: `nnUNetTrainer_Budget` of benchmarks/nnunet_runner.py without its "
             "final validation; autoseg: `autoseg train --budget`). The same network in both: nnU-Net's 3d_fullres "
             f"plan (PlainConvUNet, features {'-'.join(map(str, arch['features_per_stage']))}, "
             f"convs per stage {arch['n_conv_per_stage']}, strides {arch['strides']}), patch "
             f"{'x'.join(map(str, nn['patch_size']))}, spacing {nn['spacing']}, batch {nn['batch_size']}: "
             f"{ours / 1e6:.2f} M parameters in autoseg, {theirs / 1e6:.2f} M in nnU-Net. autoseg's fast path "
             f"runs the plan's precision `{cfg.precision}`, channels-last {cfg.channels_last}, float16 "
             "probabilities; its exact path fp32, NCDHW, float32 probabilities, on the same weights. One fold, "
             "every command a measured process tree.", "", "### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += ["", "### Results", "",
              "| tool, test-time augmentation | cases | s/case (whole command) | s/case without start-up | CPU s/case "
              "| peak PSS MB | foreground Dice | load avg (1 min) before each run |",
              "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        whole, marginal = per_case(r, key)
        lines.append(f"| {key} | {r['n']} | {whole:.2f} | {marginal:.2f} | {r['all'].cpu_s / r['n']:.2f} | "
                     f"{r['all'].peak_pss_mb:.0f} | {r['dice']:.4f} | {' / '.join(f'{v:.1f}' for v in r['load'])} |")
    lines.append("")
    for tta in ("off", "on"):
        ours_r, theirs_r = results.get(f"autoseg, TTA {tta}"), results.get(f"nnU-Net, TTA {tta}")
        if ours_r and theirs_r:
            w = per_case(ours_r, f"autoseg, TTA {tta}")[0] / per_case(theirs_r, f"nnU-Net, TTA {tta}")[0]
            m = per_case(ours_r, f"autoseg, TTA {tta}")[1] / max(per_case(theirs_r, f"nnU-Net, TTA {tta}")[1], 1e-9)
            c = ours_r["all"].cpu_s / ours_r["n"] / (theirs_r["all"].cpu_s / theirs_r["n"])
            lines.append(f"- TTA {tta}: autoseg / nnU-Net time per case {w:.2f}x (whole command), {m:.2f}x without "
                         f"start-up, {c:.2f}x in CPU seconds (the least disturbed by the machine's load); target <= "
                         f"{TARGET}x: **{'met' if max(w, m, c) <= TARGET else 'NOT met'}**")
    fast = results.get("autoseg, TTA off")
    for other, what in (("autoseg exact fp32, TTA off", "exact fp32 path (fp32, NCDHW, float32 probabilities)"),
                        ("autoseg float32 probabilities, TTA off", "float32 probabilities (fast network path)")):
        if fast and other in results:
            d = fast["dice"] - results[other]["dice"]
            lines.append(f"- autoseg fast path - {what}, same weights, TTA off: Dice {d:+.4f} (within 0.005: "
                         f"{'yes' if abs(d) <= 0.005 else '**no**'}); labels differ in "
                         f"{100 * label_difference(fast['out'], results[other]['out']):.4f}% of the voxels; "
                         f"{fast['all'].cpu_s / fast['n']:.1f} vs {results[other]['all'].cpu_s / results[other]['n']:.1f} "
                         "CPU s/case")
    lines += ["- each tool's Dice comes from its own short training; they are not the same model, so the "
              "equal-Dice condition is checked on autoseg's two paths"]
    if fast and fast["dice"] < 0.05:
        lines += ["- **the equal-Dice check is empty here**: autoseg's network learned nothing yet (Dice "
                  f"{fast['dice']:.3f}: every path predicts background), so identical labels say little about "
                  "bf16 / float16 against fp32; train longer (`--train-s`) on a quieter machine for a real check"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
