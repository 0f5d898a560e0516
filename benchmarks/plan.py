"""validate + fingerprint + plan + preprocess, autoseg vs nnU-Net: wall time and peak memory (issue 3, Performance).

    python benchmarks/plan.py [--tasks ct-aniso mri-nested] [--sizes small bench] [--cases 20] [--jobs 2]
                              [--repeats 2] [--no-nnunet]

For each synthetic task and size (generated once under benchmarks/work/data/; the issue's reference is 20 cases of
about 64x96x96: ``small`` cases are 1/5-1/3 of that, ``bench`` cases 1.4-1.7x), in one run:

1. **Totals** (the number the target is about): ``autoseg plan DIR -w W --budget 15m --device cpu -j N`` against
   ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N -npfp N`` (``-npfp``: nnU-Net's fingerprint step
   otherwise uses 8 processes), each from a fresh work folder; one untimed warm-up each, then ``--repeats``
   alternating timed rounds, medians reported. autoseg runs twice per round: **first plan** on this machine
   (its store of step measurements, ``AUTOSEG_CACHE_DIR``, emptied before each run) and **re-plan** (the store
   the warm-up run filled: the same setups' step times read back instead of measured). nnU-Net measures
   nothing, so it has one kind of run.
2. **Stages**, once: each stage as its own command, so each has its own wall time and peak memory. nnU-Net:
   ``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``, ``nnUNetv2_preprocess``; autoseg:
   ``autoseg validate``, ``autoseg fingerprint`` and this script's ``--stage plan|preprocess`` (the library
   calls ``autoseg plan`` makes). Every stage command pays its own interpreter start and imports.
   autoseg's own per-stage timings inside the one ``autoseg plan`` run are reported too.
3. **Diagnostic**, once: both totals again with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of
   spinning while they wait), which shows how much of the time is lost to spinning threads on a busy machine.

Memory is the peak over the whole process tree, pool workers included (autoseg/benchmark/measure.py). Writes
benchmarks/results/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nnunet  # noqa: E402
from fingerprint import _short, autoseg_bin, git_commit, make_data, median_of  # noqa: E402

import autoseg  # noqa: E402
from autoseg.benchmark.measure import Measurement, machine, measure  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIZES = ("small", "bench")  # small: 1/5-1/3 of the issue's ~64x96x96 reference case; bench: 1.4-1.7x it
TASK_IDS = {"ct-aniso": 502, "mri-nested": 503, "mr-2ch": 504, "vessels": 505}
BUDGET = "15m"
TARGET_SPEEDUP = 3.0
LABELS = {"autoseg": "autoseg, first plan", "autoseg-replan": "autoseg, re-plan", "nnunet": "nnU-Net"}
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Tool:
    """One tool's commands on one dataset, and how to give each run a fresh work folder."""

    name: str
    total: list[str]
    stages: dict[str, list[str]]
    env: dict[str, str]
    fresh: list[Path]  # folders removed before each total run and before the first stage
    kept: Path  # the JSON artifacts of the last timed total run are copied here
    runs: list[Measurement] = field(default_factory=list)
    stage_runs: dict[str, Measurement] = field(default_factory=dict)
    passive: Measurement | None = None
    total_logs: list[Path] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-minute load average when each timed total run started

    def clean(self) -> None:
        for folder in self.fresh:
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            elif folder.exists():
                shutil.rmtree(folder)


def autoseg_tool(data: Path, work: Path, jobs: int, replan: bool = False) -> Tool:
    """``replan``: the store of step measurements is kept between runs (the warm-up fills it); otherwise it is
    emptied before every run, as on a machine that never planned."""
    name = "autoseg-replan" if replan else "autoseg"
    w, store = work / name, work / f"{name}-measurements"
    me = [sys.executable, str(Path(__file__).resolve()), "--stage"]
    total = [autoseg_bin(), "-q", "plan", str(data), "-w", str(w), "--budget", BUDGET, "--device", "cpu",
             "-j", str(jobs)]
    stages = {} if replan else {
        "validate": [autoseg_bin(), "-q", "validate", str(data), "-j", str(jobs)],
        "fingerprint": [autoseg_bin(), "-q", "fingerprint", str(data), "-w", str(w), "-j", str(jobs)],
        "plan": [*me, "plan", str(data), str(w), "--jobs", str(jobs)],
        "preprocess": [*me, "preprocess", str(data), str(w), "--jobs", str(jobs)]}
    if replan and store.exists():
        shutil.rmtree(store)  # filled by this run's warm-up, not by an earlier benchmark
    return Tool(name, total, stages, {**os.environ, "AUTOSEG_CACHE_DIR": str(store)},
                [w] if replan else [w, store], work / f"{name}_last_total")


def nnunet_tool(data: Path, task: str, name: str, work: Path, jobs: int) -> Tool:
    ws = _nnunet.Workspace.create(f"plan_{name}")
    dataset_id = TASK_IDS[task]
    target = ws.add_dataset(data, dataset_id, re.sub(r"[^A-Za-z]", "", task.title()))
    did, n = str(dataset_id), str(jobs)
    return Tool(
        "nnunet",
        ws.command("nnUNetv2_plan_and_preprocess", "-d", did, "-c", "3d_fullres", "-np", n, "-npfp", n, "--no_pbar"),
        {"fingerprint": ws.command("nnUNetv2_extract_fingerprint", "-d", did, "-np", n, "--no_pbar"),
         "plan": ws.command("nnUNetv2_plan_experiment", "-d", did),
         "preprocess": ws.command("nnUNetv2_preprocess", "-d", did, "-c", "3d_fullres", "-np", n, "--no_pbar")},
        ws.env(), [ws.preprocessed / target.name], work / "nnunet_last_total")


def _run(tool: Tool, cmd: list[str], label: str, logs: Path, env: dict[str, str] | None = None) -> Measurement:
    log = logs / f"{tool.name}_{re.sub(r'[^a-z0-9]+', '_', label)}.log"
    m = measure(cmd, env=env or tool.env, cwd=REPO, log=log)
    if m.returncode != 0:
        sys.exit(f"{tool.name} {label} failed (exit {m.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    print(f"{label:>18}: {tool.name:8s} {m.wall_s:7.2f} s  CPU {m.cpu_s:6.1f} s  PSS {m.peak_pss_mb:6.0f} MB  "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return m


def bench_task(tools: list[Tool], repeats: int, logs: Path, diagnostic: bool) -> None:
    """Totals (warm-up + alternating rounds), then each stage once, then the passive-wait diagnostic."""
    logs.mkdir(parents=True, exist_ok=True)
    for round_ in range(repeats + 1):
        for tool in tools:
            tool.clean()
            load = os.getloadavg()[0]
            m = _run(tool, tool.total, "warm-up" if round_ == 0 else f"total {round_}", logs)
            if round_:
                tool.loads.append(load)
                tool.runs.append(m)
                tool.total_logs.append(logs / f"{tool.name}_total_{round_}.log")
    for tool in tools:  # keep the last total run's artifacts for the report, stages go elsewhere
        _keep(tool)
    for tool in tools:
        tool.clean()
        for stage, cmd in tool.stages.items():
            tool.stage_runs[stage] = _run(tool, cmd, f"stage {stage}", logs)
    if diagnostic:
        for tool in [t for t in tools if t.name != "autoseg-replan"]:
            tool.clean()
            tool.passive = _run(tool, tool.total, "total, passive", logs, {**tool.env, **PASSIVE})


def _keep(tool: Tool) -> None:
    """Copy the small artifacts (JSON) of the last timed total run to ``tool.kept``."""
    if tool.kept.exists():
        shutil.rmtree(tool.kept)
    if tool.fresh[0].exists():
        shutil.copytree(tool.fresh[0], tool.kept, ignore=shutil.ignore_patterns("*.npy", "*.npz", "*.b2nd", "*.pkl"))


# --- the report -----------------------------------------------------------------------------------------


def in_run_timings(log: Path) -> dict[str, float]:
    """autoseg's own stage timings, from the summary line ``timings: validate 1.2s, fingerprint ...``."""
    for line in log.read_text().splitlines():
        if line.startswith("timings: "):
            return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", line)}
    return {}


def dataset_facts(data: Path, task: str, size: str, autoseg_work: Path) -> str:
    from autoseg.schema.fingerprint import Fingerprint

    fp = Fingerprint.load(autoseg_work / "fingerprint.json")
    shapes = np.array([c.shape for c in fp.cases])
    disk = sum(p.stat().st_size for d in ("imagesTr", "labelsTr") for p in (data / d).iterdir())
    return (f"`{task}` (`--size {size}`): {len(fp.cases)} cases, channels {fp.channel_names}, shape (z, y, x) "
            f"median {fp.median_shape} (min {shapes.min(0).tolist()}, max {shapes.max(0).tolist()}), spacing median "
            f"{[round(s, 2) for s in fp.median_spacing]} mm, {disk / 2**20:.1f} MiB on disk (.nii.gz)")


def autoseg_plan_lines(work: Path, timings: list[dict[str, float]]) -> list[str]:
    plans = json.loads((work / "plans.json").read_text())
    out = ["- autoseg's own stage timings in each timed round (s): " + "; ".join(
        ", ".join(f"{k} {v:.1f}" for k, v in t.items()) for t in timings),
           f"- last round's planning (measuring candidate networks): **{plans['planning_time_s']:.1f} s** "
           f"(plans.json `planning_time_s`; step measurements {_reuse(plans)}); what it chose:"]
    for name, c in plans["configurations"].items():
        m = c["measured"]
        out.append(f"  - {name}: patch {c['patch_size']}, batch {c['batch_size']}, width {c['network']['features'][0]}, "
                   f"{c['precision']}, {m['step_time_s']:.3f} s/step "
                   f"{'predicted' if m.get('extrapolated') else 'measured'}, {c['schedule']['steps']} steps")
    out.append("  - planner log: " + " / ".join(n for n in plans["notes"] if not n.startswith("budget")))
    return out


def _reuse(plans: dict) -> str:
    m = plans.get("measurements") or {}
    return f"made {m.get('measured', '?')}, read back {m.get('reused', '?')}"


def nnunet_plan_line(tool: Tool) -> str:
    plans = tool.kept / "nnUNetPlans.json"
    if not plans.is_file():
        return "- nnU-Net plans: not found"
    c = json.loads(plans.read_text())["configurations"]
    parts = [f"{k}: patch {v['patch_size']}, batch {v['batch_size']}" for k, v in c.items() if "patch_size" in v]
    return "- nnU-Net planned (not measured; its preprocessing here is 3d_fullres only): " + "; ".join(parts)


def _ratio_lines(a: Measurement, n: Measurement) -> list[str]:
    speedup = n.wall_s / a.wall_s
    met = speedup >= TARGET_SPEEDUP and a.peak_pss_mb <= n.peak_pss_mb
    return [f"- **speed-up: {speedup:.2f}x** (nnU-Net wall / autoseg wall; CPU time {n.cpu_s / a.cpu_s:.2f}x); "
            f"**peak memory: autoseg {a.peak_pss_mb / n.peak_pss_mb:.2f}x nnU-Net's** (PSS; RSS "
            f"{a.peak_rss_mb / n.peak_rss_mb:.2f}x)",
            f"- target (>= {TARGET_SPEEDUP:.0f}x faster, no more peak memory): **{'met' if met else 'NOT met'}**"]


def render_task(task: str, size: str, data: Path, tools: dict[str, Tool]) -> list[str]:
    a = tools["autoseg"]
    lines = [f"## {task}, {size}", "", dataset_facts(data, task, size, a.kept), "", "### Totals (medians)", "",
             "| tool | wall (s) | peak PSS (MB) | peak RSS (MB) | largest process (MB) | CPU (s) | processes |",
             "|---|---|---|---|---|---|---|"]
    med = {name: median_of(t.runs) for name, t in tools.items()}
    for name, m in med.items():
        lines.append(f"| {LABELS[name]} | {m.wall_s:.1f} | {m.peak_pss_mb:.0f} | {m.peak_rss_mb:.0f} | "
                     f"{m.max_process_mb:.0f} | {m.cpu_s:.1f} | {m.processes:.0f} |")
    lines.append("")
    for name in ("autoseg", "autoseg-replan"):
        if name not in tools:
            continue
        how = ("step measurements read back from the store the warm-up filled" if name == "autoseg-replan"
               else "an empty store of step measurements")
        lines.append(f"**{LABELS[name]}** ({how})")
        lines.append("")
        if "nnunet" in med:
            lines += _ratio_lines(med[name], med["nnunet"])
        lines += autoseg_plan_lines(tools[name].kept, [in_run_timings(log) for log in tools[name].total_logs])
        lines.append("")
    if "nnunet" in tools:
        lines.append(nnunet_plan_line(tools["nnunet"]))
    lines += ["", "All timed rounds (wall s / PSS MB / load average at start): " + "; ".join(
        f"{LABELS[name]} " + ", ".join(f"{r.wall_s:.1f}/{r.peak_pss_mb:.0f}/{ld:.1f}" for r, ld in zip(t.runs, t.loads))
        for name, t in tools.items())]

    inside = in_run_timings(a.total_logs[-1]) if a.total_logs else {}
    lines += ["", "### Stages (each its own command, one run)", "",
              "| stage | autoseg wall (s) | autoseg peak PSS (MB) | autoseg inside the last timed `autoseg plan` (s) "
              "| nnU-Net wall (s) | nnU-Net peak PSS (MB) |", "|---|---|---|---|---|---|"]
    n = tools.get("nnunet")
    for stage in ("validate", "fingerprint", "plan", "preprocess"):
        am, nm = a.stage_runs.get(stage), n.stage_runs.get(stage) if n else None
        lines.append(f"| {stage} | {_cell(am, 'wall_s')} | {_cell(am, 'peak_pss_mb', 0)} | "
                     f"{inside.get(stage, float('nan')):.1f} | {_cell(nm, 'wall_s') if n else ''} | "
                     f"{_cell(nm, 'peak_pss_mb', 0) if n else ''} |")
    lines += ["", "nnU-Net checks the dataset only with `--verify_dataset_integrity` (not used, as in the issue's "
              "command); autoseg always validates."]
    if a.passive:
        lines += ["", f"### Diagnostic: `{' '.join(f'{k}={v}' for k, v in PASSIVE.items())}` (one run each)", "",
                  "| tool | wall (s) | peak PSS (MB) | CPU (s) |", "|---|---|---|---|"]
        lines += [f"| {LABELS[name]} | {t.passive.wall_s:.1f} | {t.passive.peak_pss_mb:.0f} | {t.passive.cpu_s:.1f} |"
                  for name, t in tools.items() if t.passive]
        if n and n.passive:
            lines += [""] + _ratio_lines(a.passive, n.passive)
    return lines + [""]


def _cell(m: Measurement | None, key: str, digits: int = 1) -> str:
    return "not run" if m is None else f"{getattr(m, key):.{digits}f}"


def render(args: argparse.Namespace, sections: list[str], tools_by_task: dict[str, dict[str, Tool]],
           nnunet_versions: dict[str, str] | None) -> str:
    import torch

    lines = ["# Plan and preprocess: autoseg vs nnU-Net", "",
             "Issue 3, Performance. Generated by `benchmarks/plan.py`: validate + fingerprint + plan + preprocess "
             f"with {args.jobs} worker processes each, fresh work folders, on the same data, in one run. Totals are "
             f"medians of {args.repeats} alternating rounds after one warm-up run of each tool.", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [f"- load average when the report was written: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
              "(a shared machine: other work ran at the same time, so absolute times are noisy)", ""]
    lines += sections
    lines += ["## What each tool does", "",
              "- autoseg `plan`: validates every file, fingerprints, plans 3d_fullres and 2d (and 3d_lowres when "
              "the image is large) by **measuring real training steps** of candidate networks on the CPU "
              "(fp32 against bf16 on a proxy patch, one timed step each after a warm-up, a second when bf16's "
              "speed-up is close to the deciding 1.1x; bf16's gradient error judged untimed, on a shallower network "
              "when the proxy's bottleneck is too small; one proxy per width; then the chosen setup, at half its "
              "batch from a batch of 4, unless the proxies already predict the largest setup fits, and once more "
              "when the measurement proves the prediction wrong), and preprocesses the configurations its budget "
              "trains (here 3d_fullres, as nnU-Net). Each step measurement is kept in a per-machine store "
              "(`~/.cache/autoseg/measurements.json`, keyed by CPU, threads, torch and autoseg versions and the exact "
              "setup); a re-plan that times the same setups reads them back (`--remeasure` times them again).",
              "- nnU-Net `plan_and_preprocess -c 3d_fullres`: fingerprints (no integrity check unless "
              "`--verify_dataset_integrity`), plans 2d/3d_fullres/3d_lowres from its rules (no measurement), "
              "preprocesses 3d_fullres only.",
              "- Wall time is the whole command (interpreter start, imports, pools); memory is the peak over the "
              "process tree sampled from /proc (PSS every 0.5 s: shared pages split between processes; RSS every "
              "50 ms: shared pages counted in each; largest process: the kernel's exact ru_maxrss). PSS is read "
              "less often because reading it stalls the measured process (autoseg's timed steps ran 1.4-1.8x "
              "slower with PSS read every 50 ms).", "",
              "## Versions", "", f"- autoseg {autoseg.__version__} (commit {git_commit()}), torch {torch.__version__}"]
    if nnunet_versions:
        lines.append("- nnU-Net venv: " + ", ".join(f"{k} {v}" for k, v in nnunet_versions.items()))
    lines += ["", "## Reproduce", "", "```", "python benchmarks/plan.py " + " ".join(
        [f"--tasks {' '.join(args.tasks)}", f"--sizes {' '.join(args.sizes)}", f"--cases {args.cases}", f"--jobs {args.jobs}",
         f"--repeats {args.repeats}", f"--seed {args.seed}"]), "```", "", "Commands timed (totals):", ""]
    for task, tools in tools_by_task.items():
        lines += [f"- {task}, {LABELS[name]}: `{' '.join(_short(c) for c in t.total)}`" for name, t in tools.items()]
    return "\n".join(lines) + "\n"


# --- the per-stage commands autoseg has no CLI for ------------------------------------------------------


def stage(name: str, data: Path, work: Path, jobs: int) -> int:
    """Run one autoseg stage on the artifacts of the previous ones, as `autoseg plan` would (with the
    command's OpenMP setting, and preprocessing the configurations it preprocesses)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the autoseg command sets it, before torch loads
    from autoseg.schema.fingerprint import Fingerprint
    from autoseg.schema.plans import Plans
    from autoseg.workdir import FINGERPRINT_FILE, PLANS_FILE

    fp = Fingerprint.load(work / FINGERPRINT_FILE)
    if name == "plan":
        from autoseg.plan.make import make_plans

        make_plans(fp, "default", BUDGET, "cpu").save(work / PLANS_FILE)
    else:
        from autoseg.preprocess import preprocess
        from autoseg.workflow import trained_configurations

        plans = Plans.load(work / PLANS_FILE)
        preprocess(data, work, plans, fp, configurations=trained_configurations(plans), jobs=jobs)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["ct-aniso", "mri-nested"], choices=sorted(TASK_IDS))
    p.add_argument("--sizes", nargs="+", default=["small"], choices=SIZES,
                   help="synthetic case sizes (the issue's reference is 20 cases of about 64x96x96)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="worker processes for both tools")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-nnunet", action="store_true", help="time autoseg only")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the OMP_WAIT_POLICY=PASSIVE runs")
    p.add_argument("--stage", nargs=3, metavar=("STAGE", "DATA", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "plan.md")
    args = p.parse_args(argv)
    if args.stage:
        return stage(args.stage[0], Path(args.stage[1]), Path(args.stage[2]), args.jobs)

    nnunet_versions = None
    if not args.no_nnunet:
        _nnunet.ensure_venv()
        nnunet_versions = _nnunet.versions()
    sections, tools_by_task = [], {}
    for size in args.sizes:
        for task in args.tasks:
            data = make_data(args.cases, args.seed, task, size)
            name = task if size == "small" else f"{task}-{size}"
            work = _nnunet.WORK / "plan" / name
            tools = {"autoseg": autoseg_tool(data, work, args.jobs),
                     "autoseg-replan": autoseg_tool(data, work, args.jobs, replan=True)}
            if not args.no_nnunet:
                tools["nnunet"] = nnunet_tool(data, task, name, work, args.jobs)
            print(f"== {task}, {size}", file=sys.stderr)
            bench_task(list(tools.values()), args.repeats, work / "logs", not args.no_diagnostic)
            tools_by_task[f"{task}, {size}"] = tools
            sections += render_task(task, size, data, tools)
    report = render(args, sections, tools_by_task, nnunet_versions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
