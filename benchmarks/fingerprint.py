"""Fingerprint extraction, autoseg vs nnU-Net: wall time and peak memory on the same data (issue 2, item 7).

    python benchmarks/fingerprint.py [--cases 32] [--jobs 2] [--repeats 3] [--no-nnunet]

Generates the CT-like task at bench size once (``autoseg synth ct-aniso ... --size bench``, under
benchmarks/work/data/), lays it out for nnU-Net (benchmarks/_nnunet.py, which makes nnU-Net's venv when
missing), then runs ``autoseg fingerprint -j N`` and ``nnUNetv2_extract_fingerprint -np N``: one untimed
warm-up each (page cache, .pyc files), then ``--repeats`` timed rounds, alternating. Each run is a whole
command as a user types it (interpreter start and imports included); memory is the peak over the whole
process tree, pool workers included (autoseg/benchmark/measure.py says exactly what). Writes
benchmarks/results/fingerprint.md with the medians, the ratios and how the two fingerprints agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nnunet  # noqa: E402

import autoseg  # noqa: E402
from autoseg.benchmark.measure import Measurement, machine, measure  # noqa: E402
from autoseg.fingerprint import SAMPLES_PER_CASE  # noqa: E402
from autoseg.schema.fingerprint import Fingerprint
from autoseg.workdir import FINGERPRINT_FILE

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TASK, SIZE, DATASET_ID = "ct-aniso", "bench", 501
TARGET_SPEEDUP = 3.0


def autoseg_bin() -> str:
    """The ``autoseg`` console script of the interpreter running this benchmark."""
    here = Path(sys.executable).parent / "autoseg"
    return str(here) if here.exists() else shutil.which("autoseg") or "autoseg"


def make_data(cases: int, seed: int, task: str = TASK, size: str = SIZE) -> Path:
    """The benchmark dataset, generated once and reused while its recipe is unchanged."""
    root = _nnunet.WORK / "data" / f"{task}_{size}_{cases}cases_seed{seed}"
    recipe = {"task": task, "size": size, "seed": seed, "version": autoseg.__version__}
    meta = root / "dataset.json"
    if meta.is_file():
        raw = json.loads(meta.read_text())
        if raw.get("autoseg_synth") == recipe and raw.get("numTraining") == cases:
            return root
        shutil.rmtree(root)
    subprocess.run([autoseg_bin(), "-q", "synth", task, str(root), "--size", size, "--cases", str(cases),
                    "--seed", str(seed)], check=True)
    return root


def run_rounds(commands: dict[str, tuple[list[str], dict | None]], repeats: int, logs: Path
               ) -> tuple[dict[str, list[Measurement]], list[float]]:
    """One warm-up per command, then ``repeats`` alternating rounds; a failing command stops the benchmark.

    Also returns the 1-minute load average seen before each timed run: the machine may be shared.
    """
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Measurement]] = {name: [] for name in commands}
    loads: list[float] = []
    for round_ in range(repeats + 1):
        for name, (cmd, env) in commands.items():
            log = logs / f"{name}_{round_}.log"
            if round_:
                loads.append(os.getloadavg()[0])
            m = measure(cmd, env=env, cwd=REPO, log=log)
            if m.returncode != 0:
                sys.exit(f"{name} failed (exit {m.returncode}); see {log}:\n{log.read_text()[-3000:]}")
            print(f"{'warm-up' if round_ == 0 else f'round {round_}'}: {name:8s} {m.wall_s:7.2f} s  "
                  f"CPU {m.cpu_s:6.1f} s  PSS {m.peak_pss_mb:6.0f} MB  RSS {m.peak_rss_mb:6.0f} MB  "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
            if round_:
                results[name].append(m)
    return results, loads


def median_of(runs: list[Measurement]) -> Measurement:
    return Measurement(**{f.name: statistics.median(getattr(r, f.name) for r in runs) for f in fields(Measurement)})


def dataset_facts(data: Path, fp: Fingerprint) -> dict[str, str]:
    shapes = np.array([c.shape for c in fp.cases])
    size = sum(p.stat().st_size for d in ("imagesTr", "labelsTr") for p in (data / d).iterdir())
    return {
        "task": f"`{TASK}` (`--size {SIZE}`), CT-like in HU, int16 NIfTI (.nii.gz), 1 channel, labels liver + tumour",
        "training cases": str(len(fp.cases)),
        "shape (z, y, x)": f"median {fp.median_shape}, min {shapes.min(0).tolist()}, max {shapes.max(0).tolist()}",
        "spacing (mm)": f"median {[round(s, 3) for s in fp.median_spacing]}",
        "voxels per case": f"{np.prod(shapes, axis=1).mean() / 1e6:.2f} M (mean)",
        "size on disk": f"{size / 2**20:.1f} MiB (imagesTr + labelsTr, gzip-compressed)",
    }


def agreement(ours: Fingerprint, theirs: dict) -> list[str]:
    """The quantities both tools compute, side by side (intensity statistics differ by sampling only)."""
    spacing_diff = np.abs(np.array([c.spacing for c in ours.cases]) - np.array(theirs["spacings"])).max()
    same_crop = sum(c.cropped_shape == list(s) for c, s in zip(ours.cases, theirs["shapes_after_crop"]))
    n = len(ours.cases)
    lines = [f"- spacing per case: largest difference {spacing_diff:.1e} mm over {n} cases",
             f"- shape after cropping to the nonzero region: identical in {same_crop} of {n} cases", "",
             f"| foreground intensity | autoseg ({SAMPLES_PER_CASE:,} per case) "
             f"| nnU-Net ({int(1e8 // n):,} per case) |", "|---|---|---|"]
    nn, ch = theirs["foreground_intensity_properties_per_channel"]["0"], ours.channels[0]
    for key in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"):
        lines.append(f"| {key} | {getattr(ch, key):.2f} | {nn[key]:.2f} |")
    return lines


MEASURED_CODE = ("autoseg/fingerprint.py", "autoseg/io.py", "autoseg/dataset.py", "autoseg/artifacts.py",
                 "autoseg/errors.py", "autoseg/cli.py", "autoseg/workdir.py")


def git_commit() -> str:
    """The commit measured, naming the files on the measured path that differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *MEASURED_CODE], cwd=REPO,
                               capture_output=True, text=True).stdout.split()[1::2]
    except OSError:
        return "unknown"
    return head + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _row(name: str, m: Measurement) -> str:
    return (f"| {name} | {m.wall_s:.2f} | {m.cpu_s:.1f} | {m.peak_pss_mb:.0f} | {m.peak_rss_mb:.0f} "
            f"| {m.hwm_sum_mb:.0f} | {m.max_process_mb:.0f} | {m.processes} |")


def render(args: argparse.Namespace, data: Path, fp: Fingerprint, runs: dict[str, list[Measurement]],
           loads: list[float], commands: dict[str, tuple[list[str], dict | None]], nnunet_versions: dict[str, str] | None,
           nnunet_fp: dict | None) -> str:
    med = {name: median_of(r) for name, r in runs.items()}
    lines = ["# Fingerprint extraction: autoseg vs nnU-Net", "",
             "Issue 2, item 7. Generated by `benchmarks/fingerprint.py`; numbers are medians of "
             f"{args.repeats} alternating rounds after one warm-up run of each tool.", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += ["", "## Dataset", ""] + [f"- {k}: {v}" for k, v in dataset_facts(data, fp).items()]
    lines += ["", f"## Results ({args.jobs} worker processes each)", "",
              "| tool | wall time (s) | CPU time (s) | peak PSS sum (MB) | peak RSS sum (MB) "
              "| sum of per-process peaks (MB) | largest process (MB) | processes |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, m) for name, m in med.items()]
    if "nnunet" in med:
        a, n = med["autoseg"], med["nnunet"]
        speedup, mem = n.wall_s / a.wall_s, a.peak_pss_mb / n.peak_pss_mb
        met = speedup >= TARGET_SPEEDUP and all(getattr(a, k) <= getattr(n, k) for k in
                                                 ("peak_pss_mb", "peak_rss_mb", "hwm_sum_mb", "max_process_mb"))
        lines += ["", f"- **speed-up: {speedup:.1f}x** in wall time (nnU-Net / autoseg); "
                      f"{n.cpu_s / a.cpu_s:.1f}x in CPU time",
                  f"- **peak memory: autoseg uses {mem:.2f}x nnU-Net's** (PSS sum; RSS sum "
                  f"{a.peak_rss_mb / n.peak_rss_mb:.2f}x, sum of per-process peaks "
                  f"{a.hwm_sum_mb / n.hwm_sum_mb:.2f}x)",
                  f"- target (>= {TARGET_SPEEDUP:.0f}x faster, no more peak memory): "
                  f"**{'met' if met else 'NOT met'}**"]
    lines += ["", "All rounds (wall s / CPU s / peak PSS MB):", ""]
    for name, rs in runs.items():
        lines.append(f"- {name}: " + ", ".join(f"{r.wall_s:.2f} / {r.cpu_s:.1f} / {r.peak_pss_mb:.0f}"
                                                for r in rs))
    lines.append("- load average while running (1 min, before each timed run): "
                 + ", ".join(f"{v:.1f}" for v in loads) + f" on {os.cpu_count()} cores")
    if statistics.median(loads) > (os.cpu_count() or 1):
        lines.append("- the machine was busy with other work while this ran: wall times are longer and noisier "
                     "than on an idle machine; CPU times and the ratios are the steadier numbers")
    lines += ["", "## What is measured", "",
              "- Wall time of the whole command (interpreter start, imports, pool start-up, writing the file).",
              "- CPU time: user + system seconds of every process of the tree (the work done, whatever else "
              "loads the machine).",
              "- Peak memory of the process tree (the command and every process it starts), sampled every "
              "50 ms from /proc: **PSS sum** counts a page shared by k processes as 1/k in each (the memory "
              "the tree takes from the machine); **RSS sum** counts shared pages (libraries, copy-on-write) "
              "in every process. **Sum of per-process peaks** adds each process's own kernel-tracked peak "
              "(VmHWM; no sampling miss), an upper bound as if all peaked at once. **Largest process** is the "
              "kernel's ru_maxrss (what `/usr/bin/time` reports), which understates a process pool.",
              "- Work done: autoseg reads every case, computes the nonzero crop box, samples 10 000 "
              "foreground intensities per case and computes per-class voxel counts, connected components and "
              "extents; nnU-Net reads every case, crops to the nonzero region (with hole filling) and samples "
              f"1e8 / cases foreground intensities per case ({int(1e8 // len(fp.cases)):,} here)."]
    if nnunet_fp is not None:
        lines += ["", "## Agreement on what both compute", "", *agreement(fp, nnunet_fp)]
    lines += ["", "## Versions", "", f"- autoseg {autoseg.__version__} (commit {git_commit()})"]
    if nnunet_versions:
        lines.append("- nnU-Net venv: " + ", ".join(f"{k} {v}" for k, v in nnunet_versions.items()))
    lines += ["", "## Reproduce", "", "```", "python benchmarks/fingerprint.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("cases", args.cases), ("jobs", args.jobs),
                                                      ("repeats", args.repeats), ("seed", args.seed))), "```",
              "", "Commands timed:", ""]
    lines += [f"- {name}: `{' '.join(_short(c) for c in cmd)}`" for name, (cmd, _) in commands.items()]
    return "\n".join(lines) + "\n"


def _short(arg: str) -> str:
    """Paths relative to the repository, so the report reads the same on every machine."""
    try:
        return str(Path(arg).relative_to(REPO))
    except ValueError:
        return arg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=32, help="training cases (issue: at least 30)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for both tools")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-nnunet", action="store_true", help="time autoseg only")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "fingerprint.md")
    args = p.parse_args(argv)

    data = make_data(args.cases, args.seed)
    work = _nnunet.WORK / "fingerprint"
    commands: dict[str, tuple[list[str], dict | None]] = {
        "autoseg": ([autoseg_bin(), "-q", "fingerprint", str(data), "-w", str(work / "autoseg"),
                     "-j", str(args.jobs)], None)}
    nnunet_versions = ws = None
    if not args.no_nnunet:
        _nnunet.ensure_venv()
        nnunet_versions = _nnunet.versions()
        ws = _nnunet.Workspace.create("fingerprint")
        ws.add_dataset(data, DATASET_ID, "CTAniso")
        commands["nnunet"] = (ws.command("nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np",
                                         str(args.jobs), "--clean", "--no_pbar"), ws.env())
    runs, loads = run_rounds(commands, args.repeats, work / "logs")
    fp = Fingerprint.load(work / "autoseg" / FINGERPRINT_FILE)
    nnunet_fp = json.loads(ws.fingerprint_file(DATASET_ID).read_text()) if ws else None
    report = render(args, data, fp, runs, loads, commands, nnunet_versions, nnunet_fp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
