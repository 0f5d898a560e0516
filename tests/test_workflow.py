"""Several ``autoseg train --fold all`` processes on one workdir (autoseg.workflow): they divide the runs, train
each once, select and bundle once; a worker killed with SIGKILL mid-run has its run taken over and finished,
with the weights an uninterrupted run gets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset

from autoseg import claims
from autoseg.checkpoint import load_checkpoint
from autoseg.fingerprint import extract_fingerprint
from autoseg.plan import rules
from autoseg.schema.plans import Configuration, Network, Plans, Schedule
from autoseg.status import workdir_status
from autoseg.train import Trainer
from autoseg.workdir import Workdir
from autoseg.workers import Pick, next_run
from autoseg.workflow import train_dataset

CONFIG = "3d_fullres"
FOLDS = 5
TIMEOUT_S = 300


def tiny_plans(fp, steps: int) -> Plans:
    spacing = rules.target_spacing(fp)
    net = Network("unet", [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], decoder_convs=1)
    cfg = Configuration(name=CONFIG, ndim=3, spacing=spacing, median_shape=fp.median_cropped_shape,
                        patch_size=[16, 16, 16], batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling(spacing), network=net,
                        schedule=Schedule(steps=steps, val_every=max(1, steps // 2)))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {CONFIG: cfg},
                 axis_order=[0, 1, 2], channel_names=fp.channel_names, labels=fp.labels,
                 file_ending=fp.file_ending, folds=FOLDS)


def make_task(root: Path, steps: int) -> tuple[Path, Workdir]:
    """Five cases, five folds, a plan and a fingerprint; not preprocessed: the workers do it (under a lock)."""
    ds = write_tiny_dataset(root / "Dataset001_Tiny", cases=FOLDS, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    fp = extract_fingerprint(ds, jobs=1)
    work = Workdir(root / "work")
    work.save_plans(tiny_plans(fp, steps))
    work.save_fingerprint(fp)
    return ds, work


def worker(ds: Path, work: Workdir, steps: int, *extra: str, fold: str = "all") -> subprocess.Popen:
    """``autoseg train --fold all`` (or ``fold``) on the CPU, one thread, fixed steps (bit-exact comparisons)."""
    cmd = [sys.executable, "-c", "from autoseg.cli import main; main()", "-q", "train", str(ds), "-w", str(work.root),
           "--fold", fold, "--steps", str(steps), "--workers", "0", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, out + err
        outs.append(out)
    return outs


def trained_here(outputs: list[str]) -> list[int]:
    """The folds each worker trained itself (not read back finished), all workers together."""
    return sorted(int(k) for out in outputs
                  for k in re.findall(rf"^{CONFIG} fold (\d+): finished after \d+ steps \(\d+s\)(?! \(already)", out, re.M))


def test_three_workers_train_every_fold_once_and_select_and_bundle_once(tmp_path):
    steps = 8
    ds, work = make_task(tmp_path, steps)
    outputs = finish([worker(ds, work, steps) for _ in range(3)])
    assert trained_here(outputs) == list(range(FOLDS)), outputs
    assert sum(out.count(f"wrote {work.selection_file}") for out in outputs) == 1, outputs
    assert sum(out.count(f"wrote {work.bundle_file}") for out in outputs) == 1, outputs
    for k in range(FOLDS):
        held = claims.holder(work.run_claim(CONFIG, k))
        assert held.generation == 1 and held.state() == "released"  # claimed once, by one worker
        assert load_checkpoint(work.run(CONFIG, k).final)["step"] == steps
        rows = work.run(CONFIG, k).log.read_text().splitlines()[1:]
        assert [int(r.split(",")[0]) for r in rows] == [steps // 2, steps]  # each validation logged once
    assert work.bundle_staleness() is None
    st = workdir_status(work.root)  # autoseg status
    assert [r.state for r in st.runs] == ["finished"] * FOLDS and st.bundle == "current"
    assert all("(released" in r.worker for r in st.runs)
    # a fourth worker finds everything done: nothing trained, nothing selected again
    again = train_dataset(ds, work.root, fold="all", steps=steps, workers=0, device="cpu", progress=False)
    assert [r.note for r in again.runs] == ["already finished"] * FOLDS and again.selection is None
    assert "is current" in again.selection_note


def test_job_array_tasks_of_one_fold_each_leave_a_bundle_of_every_fold(tmp_path):
    """``train --fold K`` (a job array): each task selects and bundles from the folds finished when it ends, one
    at a time; the bundle left at the end holds both folds, whichever task finished last."""
    steps = 6
    ds, work = make_task(tmp_path, steps)
    finish([worker(ds, work, steps, fold=str(k)) for k in (0, 1)])  # as a job array's tasks are given their fold
    assert work.bundle_staleness() is None
    assert work.load_selection().cv["3d_fullres"]["folds"] == [0, 1]


def test_a_worker_takes_the_first_free_run_and_waits_for_held_ones(tmp_path):
    work = Workdir(tmp_path)
    pending = [(CONFIG, 0, 1.0), (CONFIG, 1, 1.0)]
    mine = claims.try_claim(work.run_claim(CONFIG, 0), stale_after_s=0.3)  # held, without heartbeat
    pick = next_run(work, pending, stale_after_s=60, extend=False, wait=False)
    assert isinstance(pick, Pick) and pick.index == 1 and pick.claim is not None and not pick.taken_from
    assert next_run(work, pending[:1], stale_after_s=60, extend=False, wait=False) is None  # held, live
    t0 = time.monotonic()
    pick = next_run(work, pending[:1], stale_after_s=60, extend=False, wait=True, poll_s=0.05)
    assert time.monotonic() - t0 >= 0.2 and pick.index == 0  # waited until the silent claim went stale
    assert pick.taken_from.startswith("taken over from") and "(stale)" in pick.taken_from
    mine.release()


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_taken_over_and_the_result_equals_an_uninterrupted_run(tmp_path):
    steps = 60
    ds, work = make_task(tmp_path, steps)
    procs = [worker(ds, work, steps, "--checkpoint-every", "0.2", "--claim-timeout", "5s") for _ in range(3)]
    victim, deadline = None, time.monotonic() + TIMEOUT_S
    while victim is None and time.monotonic() < deadline:  # a worker holding a run that has a checkpoint
        for k in range(FOLDS):
            held = claims.holder(work.run_claim(CONFIG, k))
            latest = work.run(CONFIG, k).latest
            if held is not None and held.state() == "live" and latest.is_file() and not work.run(CONFIG, k).final.is_file():
                victim = next((p for p in procs if p.pid == held.pid), None)
                if victim is not None:
                    killed_fold = k
                    break
        time.sleep(0.01)
    assert victim is not None, "no worker was caught mid-run"
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    killed_at = load_checkpoint(work.run(CONFIG, killed_fold).latest)["step"]
    outputs = finish([p for p in procs if p is not victim])
    assert 0 < killed_at < steps
    assert any(f"{CONFIG} fold {killed_fold}: finished" in out and "taken over from" in out for out in outputs), outputs
    assert sum(out.count(f"wrote {work.bundle_file}") for out in outputs) == 1, outputs
    assert claims.holder(work.run_claim(CONFIG, killed_fold)).generation == 2  # claimed twice: killed, taken over
    assert work.bundle_staleness() is None

    # nothing lost: every fold's weights are those of an uninterrupted run of the same steps and seed
    reference = Workdir(tmp_path / "reference")
    reference.root.mkdir()
    for name in ("plans.json", "splits.json"):
        (reference.root / name).write_bytes((work.root / name).read_bytes())
    os.symlink((work.root / "preprocessed").resolve(), reference.root / "preprocessed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(FOLDS):
            Trainer(reference.root, CONFIG, k, steps=steps, workers=0, progress=False, device="cpu").fit()
    finally:
        torch.set_num_threads(threads)
    for k in range(FOLDS):
        expected = load_checkpoint(reference.run(CONFIG, k).final)["model"]
        got = load_checkpoint(work.run(CONFIG, k).final)["model"]
        assert all(torch.equal(expected[n], got[n]) for n in expected), f"fold {k}"
