"""Speed of this checkout against another commit, in one run: ``autoseg plan`` and ``autoseg predict`` timed
for both source trees, interleaved, on the same data and the same trained model.

    python benchmarks/commits.py --base REV [--task ct-aniso] [--size small] [--repeats 3] [--train-s 60]

A change that should not move speed (a restructuring) shows it here as ratios near 1, measured minutes apart
on one machine, instead of against numbers another session measured. The base commit is checked out with
``git worktree`` under the work folder and run from there (``PYTHONPATH``), with this interpreter and its
packages; the model is trained once, by the base commit, and its workdir read by both (a newer autoseg reads
an older workdir). Each command's wall time and peak memory are those of its whole process tree.

Timed, alternating base / head, ``--repeats`` rounds:
- ``plan``: ``autoseg plan DATA --budget 15m --replan`` with an empty store of step measurements (a first plan:
  validate, fingerprint, real steps timed, preprocess) and again with that store (a re-plan);
- ``predict``: ``autoseg predict WORK imagesTs OUT`` with ``--mirror off`` and ``--mirror on``.

Writes benchmarks/results/commits.md (median wall time per tool and command, head / base).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from autoseg.benchmark.measure import machine, measure  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def tree_at(rev: str, where: Path) -> Path:
    """A worktree of ``rev`` at ``where`` (made once, moved to ``rev`` when it is elsewhere)."""
    if not (where / ".git").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                       capture_output=True)
    subprocess.run(["git", "checkout", "-q", "--detach", rev], cwd=where, check=True)
    return where


def autoseg_cmd(tree: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """``autoseg ARGS`` run from the source ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    return [sys.executable, "-c", "from autoseg.cli import main; main()", "-q", *args], env


def run(tree: Path, *args: str, log: Path, store: Path | None = None):
    cmd, env = autoseg_cmd(tree, *args)
    env["AUTOSEG_CACHE_DIR"] = str(store) if store else "off"
    m = measure(cmd, env=env, log=log)
    if m.returncode != 0:
        raise SystemExit(f"{' '.join(args)} from {tree} failed (exit {m.returncode}); see {log}")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare this checkout with")
    p.add_argument("--task", default="ct-aniso")
    p.add_argument("--size", default="small", choices=("tiny", "small", "bench"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-s", type=float, default=60.0, help="training seconds of the model both predict with")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "commits")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "commits.md")
    a = p.parse_args()

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = tree_at(git("rev-parse", a.base), work / "base-tree")
    trees = {"base": base, "head": ROOT}
    revs = {"base": git("-C", str(base), "rev-parse", "--short", "HEAD"), "head": git("rev-parse", "--short", "HEAD")}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    data = work / "data" / f"Dataset001_{a.task}"
    if not (data / "dataset.json").is_file():
        run(base, "synth", a.task, str(data), "--size", a.size, log=logs / "synth.log")
    model = work / "model"
    if not (model / "model.autoseg").is_file():
        shutil.rmtree(model, ignore_errors=True)
        run(base, "plan", str(data), "-w", str(model), "--budget", f"{a.train_s:.0f}s", log=logs / "model-plan.log")
        run(base, "train", str(data), "-w", str(model), log=logs / "model-train.log")

    times: dict[tuple[str, str], list] = {}
    reused: dict[str, int] = {}  # re-plans that read the store back (a plan on a busy machine keeps none)
    for r in range(a.repeats):
        for who in ("base", "head") if r % 2 == 0 else ("head", "base"):
            tree, w = trees[who], work / f"plan-{who}"
            store = work / f"store-{who}"
            shutil.rmtree(store, ignore_errors=True)
            for what in ("first plan", "re-plan"):  # the first fills the emptied store, the second reads it
                m = run(tree, "plan", str(data), "-w", str(w), "--budget", "15m", "--replan",
                        log=logs / f"{who}-{what}-{r}.log", store=store)
                times.setdefault((what, who), []).append(m)
                if what == "re-plan" and "planning reused" in (logs / f"{who}-{what}-{r}.log").read_text():
                    reused[who] = reused.get(who, 0) + 1
                print(f"round {r} {who:<4} {what:<16} {m.wall_s:6.1f}s  peak {m.peak_pss_mb:5.0f} MB, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            for mirror in ("off", "on"):
                out = work / f"pred-{who}"
                shutil.rmtree(out, ignore_errors=True)
                m = run(tree, "predict", str(model), str(data / "imagesTs"), str(out), "--mirror", mirror,
                        log=logs / f"{who}-predict-{mirror}-{r}.log")
                times.setdefault((f"predict, mirroring {mirror}", who), []).append(m)
                print(f"round {r} {who:<4} predict mirror {mirror:<3} {m.wall_s:6.1f}s  peak {m.peak_pss_mb:5.0f} MB",
                      flush=True)

    lines = ["# Speed of one commit against another (benchmarks/commits.py)", "",
             f"`python benchmarks/commits.py --base {a.base} --task {a.task} --size {a.size} --repeats {a.repeats} "
             f"--train-s {a.train_s:.0f}`: base {revs['base']}, head {revs['head']}"
             + (" (with uncommitted changes)" if dirty else "") + ", interleaved in one run.", "",
             "| command | base wall s (median) | head wall s (median) | head / base | base peak MB | head peak MB |",
             "|---|---|---|---|---|---|"]
    for what in dict.fromkeys(k[0] for k in times):
        b = [m.wall_s for m in times[(what, "base")]]
        h = [m.wall_s for m in times[(what, "head")]]
        pb = max(m.peak_pss_mb for m in times[(what, "base")])
        ph = max(m.peak_pss_mb for m in times[(what, "head")])
        lines.append(f"| {what} | {statistics.median(b):.1f} ({', '.join(f'{x:.1f}' for x in b)}) | "
                     f"{statistics.median(h):.1f} ({', '.join(f'{x:.1f}' for x in h)}) | "
                     f"{statistics.median(h) / statistics.median(b):.2f} | {pb:.0f} | {ph:.0f} |")
    lines += ["", "The first plan starts from an empty store of step measurements (every setup timed); the re-plan "
              "reads that store back (it did in "
              f"{reused.get('base', 0)} of {a.repeats} base and {reused.get('head', 0)} of {a.repeats} head re-plans: "
              "a plan on a machine loaded above 1.5 per CPU keeps no measurement). Predict uses the model the base "
              f"commit trained for {a.train_s:.0f} s (its selected configuration and post-processing).", "",
              "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
