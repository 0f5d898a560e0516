"""GPU check (issue 4, item 8): plan, a short training run and the held-out prediction on CUDA, in one
prepared script for the sessions that are lent a GPU (every test still passes without one).

    python benchmarks/gpu_check.py [--task mri-nested] [--size small] [--plan-budget 3m] [--train-budget 2m]

1. generates a small synthetic task (``autoseg.synth.generate``) under ``--work``;
2. ``autoseg plan DIR -w WORK --device cuda --budget 3m``: the planner measures candidate networks on the GPU
   and picks patch, batch, width and precision (AMP bf16, or fp16 with a gradient scaler);
3. ``autoseg train DIR -w WORK --device cuda --fold 0 --config C --budget 2m``: trains fold 0, then predicts
   its held-out cases on full images (sliding window on the GPU) and scores them.

Both commands run through ``autoseg.cli.run`` in this process, so the GPU's peak-memory statistics are
readable here. Prints and writes (markdown) the step time the planner measured and the one training reached,
the peak GPU memory of training and of training + prediction, the planned precision and the held-out Dice
from ``runs/C/fold_0/validation/summary.json``. The report goes to ``$OUT/gpu_check.md`` when ``$OUT`` is
set (with the run's plans.json, log.csv, curves.png and summary.json beside it), else to
benchmarks/results/gpu_check.md. Exit code 2 when CUDA is not available, 1 when a stage fails (the report
then says which). Target: under 8 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXIT_NO_CUDA = 2
PRECISION_WORDS = {"bf16": "AMP bf16 (autocast)", "fp16": "AMP fp16 (autocast + GradScaler)", "fp32": "fp32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mri-nested", help="synthetic task (autoseg synth --help)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-budget", default="3m", help="autoseg plan --budget")
    p.add_argument("--train-budget", default="2m", help="autoseg train --budget (fold 0, one configuration)")
    p.add_argument("--config", default=None, help="configuration to train (default: 3d_fullres if planned)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to try this script itself (tiny size)")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "gpu_check", help="scratch folder (replaced)")
    return p.parse_args(argv)


def cuda_or_exit(device: str) -> str:
    """The GPU's name, or exit 2 with one line saying why nothing can be checked here."""
    import torch

    if device == "cpu":
        return "cpu (a dry run of this script, not a GPU check)"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built with {built}); "
              "run this script on a machine with an NVIDIA GPU", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA)
    return torch.cuda.get_device_name(0)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autoseg"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return out.stdout.strip() + (" (autoseg/ modified)" if dirty else "") if out.returncode == 0 else "unknown"


def stage(name: str, argv: list[str], report: dict) -> None:
    """Run one ``autoseg`` command in this process; its wall time goes into the report; a failure stops here."""
    from autoseg.cli import run

    print(f"gpu_check: autoseg {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    code = run(argv)
    report["wall_s"][name] = time.perf_counter() - t
    if code != 0:
        report["failed"] = f"`autoseg {' '.join(argv)}` exited with {code}"
        raise RuntimeError(report["failed"])


def step_times(log_csv: Path) -> list[float]:
    """Seconds per step between consecutive log rows (training, loading and validation together)."""
    import csv

    with open(log_csv, newline="") as f:
        rows = [(int(r["step"]), float(r["elapsed_s"])) for r in csv.DictReader(f)]
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(rows, rows[1:]) if s1 > s0]


def check(a: argparse.Namespace, report: dict) -> None:
    import torch

    from autoseg.checkpoint import load_checkpoint
    from autoseg.schema.plans import Plans
    from autoseg.synth import generate
    from autoseg.workdir import FINAL, PLANS_FILE, Workdir

    shutil.rmtree(a.work, ignore_errors=True)  # a fresh plan and run: nothing kept from an earlier check
    t = time.perf_counter()
    data = generate(a.task, a.work / "data" / f"Dataset900_{a.task.replace('-', '_')}", size=a.size, seed=a.seed)
    report["wall_s"]["synth"] = time.perf_counter() - t
    work = a.work / "autoseg"
    report["cases"] = json.loads((data / "dataset.json").read_text()).get("numTraining")

    stage("plan", ["-q", "plan", str(data), "-w", str(work), "--device", a.device, "--budget", a.plan_budget], report)
    plans = Plans.load(work / PLANS_FILE)
    config = a.config or ("3d_fullres" if "3d_fullres" in plans.configurations else next(iter(plans.configurations)))
    c = plans.configurations[config]
    report["plan"] = {
        "configuration": config, "configurations": list(plans.configurations), "patch": c.patch_size,
        "batch": c.batch_size, "network": f"{c.network.family}, width {c.network.features[0]}, "
                                          f"{c.network.n_stages} stages, {c.measured.parameters / 1e6:.2f} M parameters",
        "precision": c.precision, "channels_last": c.channels_last, "step_s": c.measured.step_time_s,
        "peak_mb": c.measured.peak_memory_mb, "gflops_per_step": c.measured.gflops_per_step}
    report["plan_peak_mb"] = peak_mb()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stage("train", ["-q", "train", str(data), "-w", str(work), "--device", a.device, "--fold", "0", "--config", config,
                    "--budget", a.train_budget], report)
    folder = Workdir(work).run(config, 0).folder
    state = load_checkpoint(folder / FINAL)["state"]
    per_step = step_times(folder / "log.csv")
    report["train"] = {
        "steps": int(state["total_steps"]), "elapsed_s": float(state["elapsed_s"]),
        "s_per_step": float(state["seconds_per_step"]),
        "s_per_step_median": statistics.median(per_step) if per_step else float(state["seconds_per_step"]),
        "peak_mb": state.get("peak_memory_mb"), "peak_with_prediction_mb": peak_mb()}
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    report["dice"] = {"classes": summary["mean_dice"], "mean": summary["foreground_mean_dice"],
                      "cases": len(summary["cases"])}
    report["files"] = [work / PLANS_FILE, folder / "log.csv", folder / "curves.png", folder / "validation" / "summary.json"]


def peak_mb() -> float | None:
    """Peak GPU memory allocated by this process since the last reset, in MiB (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    lines = ["# GPU check (issue 4, item 8)", "",
             f"`python benchmarks/gpu_check.py {' '.join(report['argv'])}` at {report['commit']}, {report['date']}",
             "", f"- device: {report['gpu']}; torch {report['torch']}, CUDA {report['cuda']}, cuDNN {report['cudnn']}; "
                 f"{report['host']}",
             f"- task: {report['task']} ({report['size']}, {report.get('cases')} training cases, seed {report['seed']})"]
    if report.get("failed"):
        lines += ["", f"**FAILED**: {report['failed']}"]
    lines += ["", "| stage | wall time |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} s |" for k, v in report["wall_s"].items()]
    if "plan" in report:
        p = report["plan"]
        lines += ["", f"## Plan (`--budget {report['plan_budget']}`)", "",
                  f"- configurations: {', '.join(p['configurations'])}; trained: **{p['configuration']}**",
                  f"- patch {'x'.join(map(str, p['patch']))}, batch {p['batch']}, {p['network']}",
                  f"- precision: **{PRECISION_WORDS.get(p['precision'], p['precision'])}**"
                  f"{', channels-last' if p['channels_last'] else ''}",
                  f"- planner's measured step: {fmt(p['step_s'])} s, {p['peak_mb']:.0f} MiB, "
                  f"{p['gflops_per_step']:.1f} GFLOP per step",
                  f"- peak GPU memory while planning: {fmt(report['plan_peak_mb'], '.0f')} MiB"]
    if "train" in report:
        t, p = report["train"], report["plan"]
        tflops = p["gflops_per_step"] / t["s_per_step_median"] / 1e3 if t["s_per_step_median"] > 0 else float("nan")
        lines += ["", f"## Training (fold 0, `--budget {report['train_budget']}`)", "",
                  f"- {t['steps']} steps in {t['elapsed_s']:.1f} s: {fmt(t['s_per_step'])} s/step over the run, "
                  f"{fmt(t['s_per_step_median'])} s/step median between log rows (loading and validation included; "
                  f"{p['batch'] / t['s_per_step_median']:.1f} samples/s, {tflops:.1f} TFLOP/s)",
                  f"- peak GPU memory: training {fmt(t['peak_mb'], '.0f')} MiB "
                  f"(planner's measurement {p['peak_mb']:.0f} MiB); "
                  f"training + held-out prediction {fmt(t['peak_with_prediction_mb'], '.0f')} MiB"]
    if "dice" in report:
        d = report["dice"]
        per_class = ", ".join(f"{k} {fmt(v)}" for k, v in d["classes"].items())
        lines += ["", f"## Held-out Dice (fold 0, {d['cases']} cases, full images at original geometry)", "",
                  f"- mean foreground Dice **{fmt(d['mean'])}**; {per_class}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    gpu = cuda_or_exit(a.device)
    import torch

    report: dict = {"argv": sys.argv[1:] if argv is None else argv, "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": gpu, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "host": f"{platform.node()}, {os.cpu_count()} CPUs", "task": a.task, "size": a.size,
                    "seed": a.seed, "plan_budget": a.plan_budget, "train_budget": a.train_budget, "wall_s": {}}
    t0 = time.perf_counter()
    code = 0
    try:
        check(a, report)
    except Exception as e:  # the report still says what ran and what broke
        traceback.print_exc()
        report.setdefault("failed", f"{type(e).__name__}: {e}")
        code = 1
    report["wall_s"]["total"] = time.perf_counter() - t0
    text = markdown(report)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.md").write_text(text)
    if os.environ.get("OUT"):
        for f in report.get("files", []):
            if Path(f).is_file():
                shutil.copy2(f, out_dir / Path(f).name)
    print(text)
    print(f"gpu_check: wrote {out_dir / 'gpu_check.md'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
