"""``autoseg status``: each run's state, worker, steps and Dice; the search's trials; whether the bundle is current."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import write_tiny_dataset

from autoseg import claims
from autoseg.cli import run
from autoseg.fingerprint import extract_fingerprint
from autoseg.preprocess import preprocess
from autoseg.status import status_text, workdir_status
from autoseg.train import Trainer
from autoseg.workdir import Workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def work(tmp_path) -> Workdir:
    from test_workflow import CONFIG, tiny_plans

    ds = write_tiny_dataset(tmp_path / "Dataset001_Tiny", cases=5, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    fp = extract_fingerprint(ds, jobs=1)
    work = Workdir(tmp_path / "work")
    plans = tiny_plans(fp, steps=4)
    plans.train_runs = [{"configuration": CONFIG, "fold": k, "seconds": 60.0} for k in range(4)]
    work.save_plans(plans)
    preprocess(ds, work.root, plans, fp, jobs=1)
    return work


def test_status_names_each_runs_state_worker_steps_and_dice_and_the_bundle(work, capsys):
    from test_workflow import CONFIG

    Trainer(work.root, CONFIG, 0, steps=4, workers=0, progress=False, device="cpu").fit()  # trained, not scored
    work.run(CONFIG, 0).validation_summary.parent.mkdir(parents=True, exist_ok=True)
    work.run(CONFIG, 0).validation_summary.write_text(json.dumps({"cases": {}}))  # now scored: finished
    Trainer(work.root, CONFIG, 1, steps=4, workers=0, progress=False, device="cpu", stop_after=2).fit()
    live = claims.try_claim(work.run_claim(CONFIG, 1), stale_after_s=60)  # this process "trains" fold 1
    elsewhere = work.run_claim(CONFIG, 2)
    elsewhere.mkdir(parents=True)
    (elsewhere / "000001.json").write_text(json.dumps({"host": "node7", "pid": 4242, "machine": "other/pid:[1]",
                                                       "stale_after_s": 30}))
    old = time.time() - 600
    os.utime(elsewhere / "000001.json", (old, old))

    st = workdir_status(work.root)
    got = {r.fold: (r.state, r.steps, r.planned) for r in st.runs}
    assert got == {0: ("finished", 4, 4), 1: ("training", 2, 4), 2: ("stale", 0, 4), 3: ("waiting", 0, 4)}
    assert st.runs[0].dice is not None and st.runs[1].worker.endswith("(live, heartbeat 0s ago)")
    assert st.runs[2].worker.startswith("node7 pid 4242 (stale, heartbeat 600s ago")
    assert st.trials is None and st.bundle == "no model.autoseg yet"
    text = status_text(st)
    assert f"{work.root}: 4 run(s): 1 finished, 1 training, 1 stale, 1 waiting" in text
    assert "bundle: not current (no model.autoseg yet)" in text
    live.release()

    assert run(["status", str(work.root)]) == 0
    out = capsys.readouterr().out
    assert f"{CONFIG} fold 1  stopped" in out and "(released 0s ago)" in out


def test_status_shows_the_search_table_and_finds_the_only_workdir(work, tmp_path, monkeypatch, capsys):
    work.search_dir.mkdir()
    work.search_table.write_text("trial,state,rules,dice,family,width,steps,duration_s,note\n"
                                 "0,complete,True,0.81,unet,1.0,40,12.5,\n1,pruned,False,,unet,0.5,10,3.1,pruned\n")
    st = workdir_status(work.root)
    assert [t["trial"] for t in st.trials] == ["0", "1"] and st.trials_from == str(work.search_table)
    text = status_text(st)
    assert "search (" in text and "0.8100" in text and "(rules)" in text
    monkeypatch.chdir(tmp_path)
    (tmp_path / "autoseg_work").mkdir()
    os.symlink(work.root, tmp_path / "autoseg_work" / "Dataset001_Tiny")
    assert run(["status"]) == 0 and "4 run(s)" in capsys.readouterr().out
    assert run(["status", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_bundle_is_stale_when_a_finished_fold_is_not_in_its_selection_even_if_older(tmp_path):
    """A fold whose held-out cases were scored while another worker's selection ran is older than the bundle
    that left it out: the selection's own list of folds says so (``train --fold K`` job arrays)."""
    from autoseg.schema.selection import Selection

    work = Workdir(tmp_path)
    for k in (0, 1):
        run = work.run("3d_fullres", k)
        run.validation.mkdir(parents=True)
        run.final.write_bytes(b"x")
        run.validation_summary.write_text("{}")
    work.save_selection(Selection("3d_fullres", cv={"3d_fullres": {"members": ["3d_fullres"], "folds": [0]}}))
    work.bundle_file.write_bytes(b"zip")
    assert work.bundle_staleness() == "3d_fullres fold 1 finished and is not in the selection"
    work.save_selection(Selection("3d_fullres", cv={"3d_fullres": {"members": ["3d_fullres"], "folds": [0, 1]}}))
    assert work.bundle_staleness() == "selection.json is newer"
    work.bundle_file.write_bytes(b"zip")
    assert work.bundle_staleness() is None
