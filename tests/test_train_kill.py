"""Kill-and-resume through the real CLI: ``autoseg train`` killed with SIGKILL, then run again, finishes
the run from its last checkpoint with no manual step (issue 4, item 4).

The checkpoint interval comes from ``autoseg train --checkpoint-every``, set to a
quarter second so the run writes one soon after it starts; the test kills it as soon as one exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autoseg.checkpoint import load_checkpoint
from autoseg.fingerprint import extract_fingerprint
from autoseg.plan import rules
from autoseg.preprocess import preprocess
from autoseg.schema.plans import Configuration, Network, Plans, Schedule
from autoseg.synth import generate
from autoseg.train import Trainer
from autoseg.workdir import FINAL, LATEST, Workdir

CONFIG = "3d_fullres"
STEPS = 300
VAL_EVERY = 50
TIMEOUT_S = 240


def tiny_plans(fp) -> Plans:
    """A hand-made plan (no planner measurements): a 3-stage U-Net of width 4 on 16^3 patches, batch 2."""
    spacing = rules.target_spacing(fp)
    net = Network("unet", [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [1, 1, 1], decoder_convs=1)
    cfg = Configuration(name=CONFIG, ndim=3, spacing=spacing, median_shape=fp.median_cropped_shape,
                        patch_size=[16, 16, 16], batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling(spacing), network=net,
                        schedule=Schedule(steps=STEPS, val_every=VAL_EVERY))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {CONFIG: cfg},
                 axis_order=[0, 1, 2], channel_names=fp.channel_names, labels=fp.labels,
                 file_ending=fp.file_ending, folds=2)


@pytest.fixture
def task(tmp_path) -> tuple[Path, Path]:
    ds = generate("mri-nested", tmp_path / "ds", size="tiny", seed=1)
    fp = extract_fingerprint(ds, jobs=1)
    work = tmp_path / "work"
    plans = tiny_plans(fp)
    plans.save(work / "plans.json")
    preprocess(ds, work, plans, fp, jobs=1)
    return ds, work


def train_command(ds: Path, work: Path) -> list[str]:
    """``autoseg train`` (the console script's ``main``) for fold 0, a fixed number of steps, no workers, on
    the CPU (bit-exact comparisons; CUDA kernels may be nondeterministic)."""
    return [sys.executable, "-c", "from autoseg.cli import main; main()", "-q", "train", str(ds), "-w", str(work),
            "--fold", "0", "--config", CONFIG, "--steps", str(STEPS), "--workers", "0", "--device", "cpu",
            "--checkpoint-every", "0.25"]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def log_rows(folder: Path) -> list[str]:
    return (folder / "log.csv").read_text().splitlines()[1:]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_killed_autoseg_train_resumes_from_its_last_checkpoint_when_run_again(task, tmp_path):
    ds, work = task
    folder = Workdir(work).run(CONFIG, 0).folder
    cmd, env = train_command(ds, work), cli_env()

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (folder / LATEST).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None or not (folder / LATEST).is_file():
        proc.kill()
        pytest.fail(f"no checkpoint before the run ended or timed out:\n{proc.communicate()[0]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(folder / LATEST)["step"]
    assert 0 < killed_at < STEPS, f"killed at step {killed_at}: the run was not interrupted mid-way"
    kept = [r for r in log_rows(folder) if int(r.split(",")[0]) <= killed_at]
    (folder / f".{LATEST}.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # as if killed mid-write

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{CONFIG} fold 0: finished after {STEPS} steps" in again.stdout, again.stdout
    final = load_checkpoint(folder / FINAL)
    assert final["step"] == STEPS and final["state"]["finished"]
    rows = log_rows(folder)
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == list(range(VAL_EVERY, STEPS + 1, VAL_EVERY)), steps  # each once, in order
    assert rows[: len(kept)] == kept  # the rows before the kill are the first run's: resumed, not restarted
    assert not temp_files(folder), temp_files(folder)
    assert (folder / "validation" / "summary.json").is_file()

    # nothing lost: the same weights as an uninterrupted run of the same steps and seed
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in ("plans.json", "splits.json"):
        (reference / name).write_bytes((work / name).read_bytes())
    os.symlink((work / "preprocessed").resolve(), reference / "preprocessed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the CLI processes (OMP_NUM_THREADS=1): the same reduction order
    try:
        Trainer(reference, CONFIG, 0, steps=STEPS, workers=0, progress=False, device="cpu").fit()
    finally:
        torch.set_num_threads(threads)
    expected = load_checkpoint(Workdir(reference).run(CONFIG, 0).folder / FINAL)["model"]
    assert all(torch.equal(expected[k], final["model"][k]) for k in expected)


def test_checkpoint_interval_comes_from_the_option_then_the_plan(task, capsys):
    from autoseg.cli import run
    from autoseg.errors import UserError

    ds, work = task
    planned = Workdir(work).load_plans().configurations[CONFIG].schedule.checkpoint_every_s
    assert planned == 300.0 and Trainer(work, CONFIG, 0, steps=1).checkpoint_every_s == planned
    assert Trainer(work, CONFIG, 0, steps=1, checkpoint_every_s=2.5).checkpoint_every_s == 2.5
    with pytest.raises(UserError, match="checkpoint interval"):
        Trainer(work, CONFIG, 0, steps=1, checkpoint_every_s=0.0)
    for bad in ("soon", "0", "-1", "nan"):
        assert run(["train", str(ds), "-w", str(work), "--steps", "1", "--checkpoint-every", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--checkpoint-every '{bad}'" in err[0]


def test_the_planned_interval_stretches_when_a_checkpoint_is_slow_to_write_and_a_given_one_does_not(
        task, monkeypatch):
    """Checkpointing stays under 1 % of the run: a write that takes 50 ms spaces the planned checkpoints at least
    5 s apart; an interval given with --checkpoint-every is taken as given."""
    from autoseg import train

    ds, work = task
    wd = Workdir(work)
    plans = wd.load_plans()
    cfg = plans.configurations[CONFIG]
    plans.configurations[CONFIG] = replace(cfg, schedule=replace(cfg.schedule, checkpoint_every_s=0.01))
    wd.save_plans(plans)
    written, save = [], train.save_checkpoint

    def slow_save(path, *args):
        time.sleep(0.05)
        save(path, *args)
        written.append((path.name, time.monotonic()))

    monkeypatch.setattr(train, "save_checkpoint", slow_save)
    Trainer(work, CONFIG, 0, steps=40, workers=0, progress=False, device="cpu").fit()
    periodic = [t for name, t in written if name == LATEST][:-1]  # the last one is written at the end
    assert periodic, written  # the first comes after the planned 0.01 s
    assert all(b - a >= 5.0 for a, b in zip(periodic, periodic[1:])), periodic
    written.clear()
    Trainer(work, CONFIG, 1, steps=40, workers=0, progress=False, device="cpu", checkpoint_every_s=0.01).fit()
    assert sum(name == LATEST for name, _ in written) > 10


def test_stale_temporary_files_of_a_killed_write_are_removed(tmp_path):
    from autoseg.train import remove_stale_temp_files

    (tmp_path / "validation").mkdir()
    stale = [tmp_path / f".{LATEST}.x1y2.tmp", tmp_path / ".tmp-curves.png", tmp_path / "validation" / ".a.npz.q.tmp"]
    kept = [tmp_path / LATEST, tmp_path / "log.csv", tmp_path / "validation" / "a.npz"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
