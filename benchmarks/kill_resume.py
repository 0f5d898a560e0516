"""What a kill costs: ``autoseg train`` killed with SIGKILL at random moments, run again each time (issue 23).

    python benchmarks/kill_resume.py [--run 4m] [--kills 10] [--seed 0] [--task mri-nested] [--size small]

One timed run (``autoseg train --fold 0 --budget RUN``: the run's checkpoint interval follows from RUN, 5 % of
it) is started, killed with SIGKILL when it reaches a share of its steps drawn at random, and started again,
``--kills`` times (the shares drawn uniformly over the run, in order); the last start runs to the end. For each kill: the step the run had reached (from its
progress bar), the step its checkpoint on disk held (where the next start resumes), the steps and seconds lost
in between (seconds: those steps at the run's pace), and the step the next start did resume from (read from its own progress bar: it must be the
checkpoint's, and never 0 once a checkpoint interval has passed). The dataset is made and planned once under
benchmarks/work/kill_resume/ (``autoseg synth``, ``autoseg plan --budget RUN``).

Writes benchmarks/results/kill_resume.md (the median and worst steps and seconds lost per kill, and the table);
``--out`` elsewhere. Every process runs under ``nice -n 19`` with one torch thread: a shared machine's other work
is left alone, and the step times are those of one thread.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "kill_resume"
RESULTS = BENCH / "results" / "kill_resume.md"
PROGRESS = re.compile(r"(\d+)/(\d+) \[")


def autoseg(*args: str) -> list[str]:
    return ["nice", "-n", "19", sys.executable, "-m", "autoseg", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AUTOSEG_CACHE_DIR": "off"}


class Run:
    """One start of ``autoseg train``, its progress bar read as it goes (tqdm on stderr, carriage returns)."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.first: int | None = None  # the step its bar started at: where it resumed
        self.step, self.total, self.started = 0, 0, None
        self.text = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := self.proc.stderr.read1(4096):
            self.text += chunk
            buf = (buf + chunk)[-4096:]
            found = PROGRESS.findall(buf.decode(errors="replace"))
            if found:
                step, total = map(int, found[-1])
                if self.first is None:
                    self.first, self.started = step, time.monotonic()
                self.step, self.total = step, total


def checkpoint(work: Path) -> tuple[int, float] | None:
    """(step, modification time) of fold 0's latest checkpoint, None before the first."""
    import torch

    path = work / "runs" / "3d_fullres" / "fold_0" / "checkpoint_latest.pt"
    if not path.is_file():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ck["step"]), path.stat().st_mtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="4m", help="the run's budget (default %(default)s)")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="mri-nested")
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from autoseg.plan.budget import checkpoint_interval, parse_duration

    run_s = parse_duration(a.run)
    rng = random.Random(a.seed)
    data = WORK / f"{a.task}-{a.size}" / "Dataset001_Kill"
    work = WORK / f"{a.task}-{a.size}" / f"work-{a.run}-{a.seed}"
    if not data.is_dir():
        subprocess.run(autoseg("-q", "synth", a.task, str(data), "--size", a.size), env=environment(), check=True)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    subprocess.run(autoseg("-q", "plan", str(data), "-w", str(work), "--budget", a.run, "-j", "1"),
                   env=environment(), check=True, stdout=subprocess.DEVNULL)
    train = autoseg("train", str(data), "-w", str(work), "--fold", "0", "--budget", a.run, "--workers", "1")
    # the moments to kill at: shares of the run drawn uniformly, in order, each reached after the last resume
    moments = sorted(rng.uniform(0.02, 0.98) for _ in range(a.kills))
    kills, t_begin = [], time.time()
    for k in range(a.kills + 1):
        run = Run(train)
        while run.first is None and run.proc.poll() is None:
            time.sleep(0.05)
        if k > 0:
            kills[-1]["resumed_from"] = run.first
        if k == a.kills or run.proc.poll() is not None:
            run.proc.wait()
            break
        while run.proc.poll() is None and run.step < moments[k] * run.total:
            time.sleep(0.01)
        if run.proc.poll() is not None:  # it finished first: nothing to kill
            break
        at, into = run.step, time.monotonic() - run.started
        os.killpg(run.proc.pid, signal.SIGKILL)  # its own process group: the trainer and its loader workers
        run.proc.wait()
        saved = checkpoint(work)
        ck_step = saved[0] if saved is not None else 0
        lost = max(0, at - ck_step)
        kills.append({"kill": k + 1, "moment": round(moments[k], 3), "seconds_into_start": round(into, 1),
                      "step": at, "total": run.total, "checkpoint": ck_step, "lost_steps": lost,
                      "lost_s": round(lost * run_s / max(run.total, 1), 1)})  # the training time they took
        print(f"kill {k + 1}: at step {at}/{run.total}, checkpoint at {ck_step}, lost {lost} steps", flush=True)
    finished = (work / "runs" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file()
    write(a, run_s, checkpoint_interval(run_s), [r for r in kills if "kill" in r], finished, time.time() - t_begin)


def write(a, run_s: float, every_s: float, kills: list[dict], finished: bool, wall_s: float) -> None:
    steps = [r["lost_steps"] for r in kills]
    seconds = [r["lost_s"] for r in kills]
    after_first = [r for r in kills if r["checkpoint"] > 0 or r["seconds_into_start"] > every_s]
    from_zero = [r for r in after_first if r.get("resumed_from") == 0]
    wrong = [r for r in kills if r.get("resumed_from") not in (None, r["checkpoint"])]
    total = kills[0]["total"] if kills else 0
    lines = [
        "# What a kill costs (issue 23)",
        "",
        f"`python benchmarks/kill_resume.py --run {a.run} --kills {a.kills} --seed {a.seed} --task {a.task} "
        f"--size {a.size}`: one timed run of {a.run} (`autoseg train --fold 0 --budget {a.run}`, about {total} steps, "
        f"one torch thread, `nice -n 19`), checkpoint interval {every_s:g} s (5 % of the run), SIGKILLed at "
        f"{len(kills)} random moments and started again each time; {wall_s / 60:.1f} minutes in all.",
        "",
    ]
    if steps:
        lines += [f"- steps lost per kill: median {statistics.median(steps):g}, worst {max(steps)} "
                  f"(of about {total}: worst {100 * max(steps) / max(total, 1):.1f} %)",
                  f"- seconds lost per kill: median {statistics.median(seconds):g}, worst {max(seconds):g} "
                  f"(the interval is {every_s:g} s)",
                  f"- every start resumed from its checkpoint: {'yes' if not wrong else f'no ({len(wrong)})'}; "
                  f"from step 0 after the first checkpoint interval: {len(from_zero)}",
                  f"- the last start finished the run: {'yes' if finished else 'no'}", ""]
    lines += ["| kill | share of the run | s into its start | at step | checkpoint step | next start resumed at "
              "| steps lost | s lost |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in kills:
        lines.append(f"| {r['kill']} | {r['moment']} | {r['seconds_into_start']} | {r['step']} | {r['checkpoint']} | "
                     f"{r.get('resumed_from', '-')} | {r['lost_steps']} | {r['lost_s']} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    note = a.out.read_text() if a.out.is_file() else ""
    keep = note.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in note else ""
    a.out.write_text("\n".join(lines) + "\n\n<!-- notes -->" + keep if keep else "\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
