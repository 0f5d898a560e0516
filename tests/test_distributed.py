"""DDP under torchrun: two CPU processes (gloo) train one run, split the batch, and only rank 0 writes.

The launches are real ``python -m torch.distributed.run --standalone`` subprocesses running the trainer
(fold 0, stopped after 2 of 4 steps) and then the ``autoseg train`` workflow for both folds: it resumes
fold 0, trains fold 1 in the same processes (one process group for both runs), validates on rank 0 only
and predicts the held-out cases on rank 0 only. A small script, written next to the data, records
the size of every batch each rank drew and prints it as one ``RANK_REPORT`` line per rank. A slow test meets
through a c10d rendezvous on a localhost endpoint (as nodes do), kills one rank and resumes the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.fingerprint import extract_fingerprint
from autoseg.nets import build_network
from autoseg.plan import rules
from autoseg.preprocess import preprocess
from autoseg.schema.plans import Configuration, Network, Plans, Schedule
from autoseg.synth import generate
from autoseg.workdir import FINAL, LATEST, Workdir

CONFIG = "3d_fullres"
LAUNCH_TIMEOUT_S = 240  # a hang (a collective only some ranks reach) fails the test instead of blocking it

SCRIPT = '''
import json, logging, os, sys

from autoseg import train

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # autoseg's notices
from autoseg.workflow import train_dataset

seen = []
_make = train.RankBatches.make


def make(self, step):
    batch = _make(self, step)
    seen.append(int(batch["data"].shape[0]))
    return batch


train.RankBatches.make = make
mode, dataset, work, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "stop":
    train.Trainer(work, "3d_fullres", 0, steps=steps, workers=0, progress=False, device="cpu", stop_after=2).fit()
else:
    train_dataset(dataset, work, fold="all", steps=steps, workers=0, progress=False, device="cpu")
report = {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]), "batches": seen}
print("RANK_REPORT " + json.dumps(report), flush=True)
'''


def tiny_plans(fp, steps: int = 4) -> Plans:
    """A hand-made plan (no planner measurements): a 3-stage U-Net of width 4 on 16^3 patches, batch 2."""
    spacing = rules.target_spacing(fp)
    net = Network("unet", [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], decoder_convs=1)
    cfg = Configuration(name=CONFIG, ndim=3, spacing=spacing, median_shape=fp.median_cropped_shape,
                        patch_size=[16, 16, 16], batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling(spacing), network=net,
                        schedule=Schedule(steps=steps, val_every=2))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {CONFIG: cfg},
                 axis_order=[0, 1, 2], channel_names=fp.channel_names, labels=fp.labels,
                 file_ending=fp.file_ending, folds=2)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path, Plans]:
    root = tmp_path_factory.mktemp("ddp")
    ds = generate("mri-nested", root / "ds", size="tiny", seed=1)
    fp = extract_fingerprint(ds, jobs=1)
    work = root / "work"
    plans = tiny_plans(fp)
    plans.save(work / "plans.json")
    preprocess(ds, work, plans, fp, jobs=1)
    return ds, work, plans


def torchrun(script: Path, *args: str | Path) -> tuple[str, list[dict]]:
    """Run ``script`` in 2 CPU processes under torchrun; its output and the ranks' reports, by rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), *map(str, args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun hung for {LAUNCH_TIMEOUT_S}s (a deadlock between ranks?)\n{e.stdout}\n{e.stderr}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    # the ranks share one stdout, so two reports can land on one line: find them anywhere
    reports = [json.loads(m) for m in re.findall(r"RANK_REPORT (\{[^{}]*\})", p.stdout)]
    return out, sorted(reports, key=lambda r: r["rank"])


def initial_weights(plans: Plans) -> dict[str, torch.Tensor]:
    """The weights a fresh run starts from (the trainer seeds with seed + 1000 * fold before building)."""
    cfg = plans.configurations[CONFIG]
    torch.manual_seed(0)
    return build_network(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim).state_dict()


def test_two_cpu_processes_split_the_batch_only_rank_0_writes_and_a_stopped_run_resumes(task, tmp_path):
    """Also: two runs in one torchrun launch (fold 0 resumed, then fold 1) share one process group."""
    ds, work, plans = task
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    folder = Workdir(work).run(CONFIG, 0).folder

    out, reports = torchrun(script, "stop", ds, work, 4)
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world"] == 2 for r in reports), out
    assert all(r["batches"] == [1, 1] for r in reports), reports  # batch 2 over 2 ranks: 1 each, 2 steps
    assert out.count("batch 2 = 2 x 1 per rank") == 1, out  # said once: by rank 0 only
    stopped = load_checkpoint(folder / LATEST)
    assert stopped["step"] == 2 and not stopped["state"]["finished"]
    assert stopped["state"]["world"] == 2 and stopped["state"]["batch_per_rank"] == 1
    assert not (folder / FINAL).exists()

    out, reports = torchrun(script, "resume", ds, work, 4)
    assert all(r["batches"] == [1] * 6 for r in reports), reports  # fold 0 from step 2: 2 steps; fold 1: 4
    final = load_checkpoint(folder / FINAL)
    assert final["step"] == 4 and final["state"]["finished"] and final["state"]["world"] == 2

    start, mid, end = initial_weights(plans), stopped["model"], final["model"]
    assert start.keys() == end.keys()
    assert all(torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert any(not torch.equal(mid[k], end[k]) for k in mid)

    # one writer: one row per validation step, no temporary files, held-out cases predicted once
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([LATEST, FINAL, "log.csv", "curves.png", "validation"]), names
    steps = [int(line.split(",")[0]) for line in (folder / "log.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4], steps
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert summary["fold"] == 0 and summary["cases"]
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    fold1 = load_checkpoint(Workdir(work).run(CONFIG, 1).folder / FINAL)
    assert fold1["step"] == 4 and fold1["state"]["batch_per_rank"] == 1
    assert (Workdir(work).run(CONFIG, 1).folder / "validation" / "summary.json").is_file()


def _rank_process(parent: int, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` that the torchrun agent ``parent`` started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_under_a_c10d_rendezvous_resumes_to_the_uninterrupted_weights(task, tmp_path):
    """Two CPU processes meet through a c10d rendezvous on a localhost endpoint (as nodes do on their head node);
    rank 1 is killed with SIGKILL mid-run, torchrun ends the job, and the same command resumes the run from its
    last checkpoint to the weights an uninterrupted two-process run reaches."""
    import signal
    import socket
    import time

    ds, base, plans = task
    steps = 40

    def workdir(name: str) -> Path:
        work = tmp_path / name
        work.mkdir()
        p = tiny_plans(extract_fingerprint(ds, jobs=1), steps=steps)
        p.configurations[CONFIG].schedule.val_every = 10
        p.save(work / "plans.json")
        os.symlink((base / "preprocessed").resolve(), work / "preprocessed")
        return work

    def launch(work: Path) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "autoseg-test",
               "--max-restarts", "0", "-m", "autoseg", "-q", "train", str(ds), "-w", str(work), "--fold", "0",
               "--steps", str(steps), "--workers", "0", "--device", "cpu", "--checkpoint-every", "0.25"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    work = workdir("killed")
    latest = Workdir(work).run(CONFIG, 0).latest
    job = launch(work)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not latest.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    rank1 = _rank_process(job.pid, 1)
    assert rank1 is not None and latest.is_file(), job.communicate()[0] if job.poll() is not None else "timed out"
    os.kill(rank1, signal.SIGKILL)
    out = job.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    assert job.returncode != 0, out
    killed_at = load_checkpoint(latest)["step"]
    assert 0 < killed_at < steps, killed_at

    again = launch(work)
    out = again.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    assert again.returncode == 0, out
    final = load_checkpoint(Workdir(work).run(CONFIG, 0).final)
    assert final["step"] == steps and final["state"]["world"] == 2

    reference = workdir("reference")
    whole = launch(reference)
    out = whole.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    assert whole.returncode == 0, out
    expected = load_checkpoint(Workdir(reference).run(CONFIG, 0).final)["model"]
    assert all(torch.equal(expected[k], final["model"][k]) for k in expected)
