"""Fine-tuning a bundle on a site's dataset (``autoseg plan|train DATASET --init model.autoseg``)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset
from test_predict import hand_plans, save_random_folds

from autoseg import finetune
from autoseg.bundle import load_bundle, pack_bundle
from autoseg.checkpoint import load_checkpoint
from autoseg.cli import run
from autoseg.fingerprint import extract_fingerprint
from autoseg.schema.plans import Schedule
from autoseg.train import Trainer
from autoseg.workdir import Workdir
from autoseg.workflow import plan_dataset, train_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SOURCE_STEPS = 40  # the rule gives half: 20 steps per fine-tuning run


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A two-fold bundle of a tiny 3D dataset (random weights: what is tested is where they go)."""
    root = tmp_path_factory.mktemp("source")
    ds = write_tiny_dataset(root / "Dataset001_Source", cases=3, seed=0)
    fp = extract_fingerprint(ds, jobs=1)
    plans = hand_plans(fp, "3d_fullres", 3, [8, 16, 16], [])
    cfg = plans.configurations["3d_fullres"]
    plans = replace(plans, configurations={"3d_fullres": replace(cfg, schedule=Schedule(steps=SOURCE_STEPS))})
    work = root / "work"
    plans.save(work / "plans.json")
    save_random_folds(work, plans, "3d_fullres")
    return pack_bundle(work)


def site(root: Path, **kw) -> Path:
    return write_tiny_dataset(root / "Dataset002_Site", cases=4, seed=1, **kw)


def test_fine_tuning_trains_each_bundle_network_and_the_new_bundle_records_its_source(source, tmp_path):
    ds, work = site(tmp_path), tmp_path / "work"
    assert run(["-q", "plan", str(ds), "-w", str(work), "--init", str(source), "--folds", "2", "--budget", "1h",
                "-j", "1"]) == 0
    assert run(["-q", "train", str(ds), "-w", str(work), "--fold", "all", "--workers", "0"]) == 0
    plans = Workdir(work).load_plans()
    cfg, src = plans.configurations["3d_fullres"], load_bundle(source)
    assert cfg.optimizer.lr == pytest.approx(src.plans.configurations["3d_fullres"].optimizer.lr * finetune.LR_FACTOR)
    assert cfg.schedule.steps == SOURCE_STEPS // 2
    assert (cfg.spacing, cfg.patch_size, cfg.network) == (src.plans.configurations["3d_fullres"].spacing,
                                                          [8, 16, 16], src.plans.configurations["3d_fullres"].network)
    for k in (0, 1):  # run k started from the bundle's fold k, and trained away from it
        final = load_checkpoint(Workdir(work).run("3d_fullres", k).final)
        assert final["step"] == SOURCE_STEPS // 2
        assert Path(final["state"]["init_weights"]).name == f"fold_{k}.pt"
        start = load_checkpoint(Workdir(work).init_weights("3d_fullres", k))["model"]
        assert all(torch.equal(start[n], src.weights["3d_fullres"][k][n]) for n in start)
        assert any(not torch.equal(final["model"][n], start[n]) for n in start)
    new = work / "model.autoseg"
    with zipfile.ZipFile(new) as z:
        manifest = json.loads(z.read("manifest.json"))
        card = z.read("README.md").decode()
    came_from = manifest["fine_tuned_from"]
    assert came_from["sha256"] == finetune.sha256_file(source)
    assert came_from["bundle"] == source.name and came_from["dataset"] == "Dataset001_Source"
    assert came_from["created"] == src.manifest["created"]
    assert manifest["dataset"] == "Dataset002_Site"
    assert f"fine-tuned from `{source.name}`" in card and came_from["sha256"][:16] in card
    assert run(["-q", "verify", str(new)]) == 0


@pytest.mark.parametrize("change, word", [({"channels": ("CT",)}, "channels"),
                                          ({"channels": ("MRI", "T2")}, "channels"),
                                          ({"labels": {"background": 0, "organ": 1}}, "labels")])
def test_a_dataset_with_other_channels_or_classes_is_refused_in_one_line(source, tmp_path, capsys, change, word):
    ds, work = site(tmp_path, **change), tmp_path / "work"
    assert run(["train", str(ds), "-w", str(work), "--init", str(source)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0] and str(source) in err[0] and "dataset.json" in err[0]
    assert not work.exists()  # nothing written


def test_init_into_a_workdir_holding_another_plans_runs_is_refused(source, tmp_path, capsys):
    ds, work = site(tmp_path), tmp_path / "work"
    Workdir(work).run("3d_fullres", 0).folder.mkdir(parents=True)
    plans = hand_plans(extract_fingerprint(ds, jobs=1), "3d_fullres", 3, [8, 16, 16], [])
    plans.save(work / "plans.json")
    assert run(["train", str(ds), "-w", str(work), "--init", str(source)]) == 2
    assert "another plan" in capsys.readouterr().err


def test_a_stopped_fine_tuning_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(source, tmp_path):
    ds = site(tmp_path)
    finals = []
    for name, stop in (("uninterrupted", None), ("stopped", 7)):
        work = tmp_path / name
        plans = plan_dataset(ds, work, budget="1h", device="cpu", jobs=1, init=source, folds=2).plans
        steps = plans.configurations["3d_fullres"].schedule.steps
        if stop is not None:  # a run stopped part-way (as a kill after a checkpoint leaves it)
            Trainer(work, "3d_fullres", 0, plans=plans, steps=steps, device="cpu", workers=0, progress=False,
                    stop_after=stop, init_weights=finetune.init_weights_for(Workdir(work), plans, "3d_fullres", 0)
                    ).fit()
            assert load_checkpoint(Workdir(work).run("3d_fullres", 0).latest)["step"] == stop
        # the same command again, the plan kept (same bundle, dataset and budget)
        again = plan_dataset(ds, work, budget="1h", device="cpu", jobs=1, init=source)
        assert not again.replanned
        result = train_dataset(ds, work, fold=0, device="cpu", workers=0, progress=False)
        assert result.runs[0].finished and result.runs[0].steps == steps
        finals.append(load_checkpoint(Workdir(work).run("3d_fullres", 0).final)["model"])
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_the_rule_takes_the_fewest_of_budget_data_and_source_steps():
    assert finetune.finetune_steps(budget_steps=5000, train_cases=1, source_steps=4000) == finetune.MIN_STEPS
    assert finetune.finetune_steps(budget_steps=5000, train_cases=20, source_steps=4000) == 20 * finetune.STEPS_PER_CASE
    assert finetune.finetune_steps(budget_steps=60, train_cases=20, source_steps=4000) == 60
    assert finetune.finetune_steps(budget_steps=5000, train_cases=20, source_steps=100) == 50
