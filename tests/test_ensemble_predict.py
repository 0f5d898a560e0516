"""``autoseg predict`` applies the ensemble ``selection.json`` chose: the members' probabilities averaged in the
original array as the selection scored them, the ensemble's own post-processing, from a workdir and from a
bundle; ``--config`` still runs one configuration.

Two configurations in different preprocessed spaces (a 2D one at the data's spacing, a 3D one at twice it),
random-init folds; the out-of-fold outputs come from the real validation code.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_predict import hand_plans, input_files, save_random_folds

from autoseg.bundle import load_bundle, pack_bundle
from autoseg.cli import run
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference import Predictor
from autoseg.io import read_image, read_label
from autoseg.oof import predict_fold_validation
from autoseg.plan import rules
from autoseg.postprocess import apply_postprocessing
from autoseg.preprocess import preprocess
from autoseg.schema.plans import Plans
from autoseg.select import _Scorer, find_oof, select_model
from autoseg.synth import generate
from autoseg.workdir import SELECTION_FILE, Workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEMBERS = ["3d_lowres", "2d"]
HELD_OUT = {0: ["ctaniso_000"], 1: ["ctaniso_001", "ctaniso_002"]}


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> tuple[Path, Path]:
    """A workdir with two configurations, two random folds each, their out-of-fold outputs, and a selection
    forced to the ensemble of both (random networks give the greedy search nothing to prefer)."""
    root = tmp_path_factory.mktemp("ensemble")
    ds = generate("ct-aniso", root / "ds", size="tiny", cases=3, seed=2)
    fp = extract_fingerprint(ds, jobs=1)
    flat = hand_plans(fp, "2d", 2, [16, 16], [0, 1])
    low = hand_plans(fp, "3d_lowres", 3, [8, 8, 8], [1, 2]).configurations["3d_lowres"]
    spacing = [2 * s for s in low.spacing]
    low = replace(low, spacing=spacing, resampling=rules.resampling(spacing))
    plans = replace(flat, configurations={"3d_lowres": low, "2d": flat.configurations["2d"]},
                    train_runs=[{"configuration": c, "fold": k, "seconds": 1.0} for c in MEMBERS for k in (0, 1)])
    work = root / "work"
    plans.save(work / "plans.json")
    fp.save(work / "fingerprint.json")
    for c in MEMBERS:
        save_random_folds(work, plans, c)
    preprocess(ds, work, plans, fp, jobs=1)
    for c in MEMBERS:
        for k, cases in HELD_OUT.items():
            predict_fold_validation(work, ds, plans, c, k, cases)
    selection = select_model(work, ds, postprocessing=False).to_dict()
    rule = [{"rule": "largest_component", "classes": [1]}]
    selection.update(configuration=MEMBERS[0], ensemble=MEMBERS, postprocessing=rule,
                     postprocessing_by_model={"+".join(MEMBERS): rule, MEMBERS[0]: []})
    (work / SELECTION_FILE).write_text(json.dumps(selection))
    return ds, work


def scorer(ds: Path, work: Path) -> _Scorer:
    refs = {p.name.replace(".nii.gz", ""): p for p in (ds / "labelsTr").glob("*.nii.gz")}
    return _Scorer(find_oof(work), refs, [1, 2], None, ".nii.gz")


def test_predicting_the_out_of_fold_cases_reproduces_the_labels_selection_scored(ensemble):
    ds, work = ensemble
    s = scorer(ds, work)
    for fold, cases in HELD_OUT.items():
        p = Predictor.from_workdir(work, folds=[fold], mirror="off", postprocessing=())
        assert [m.name for m in p.members] == MEMBERS
        for cid in cases:
            images, geometry = read_image(ds / "imagesTr" / f"{cid}_0000.nii.gz")
            seg, probs = p.predict_case(images, geometry, probabilities=True)
            oof = [s.probabilities(m, cid) for m in MEMBERS]
            np.testing.assert_allclose(probs.astype(np.float32), (oof[0] + oof[1]) / 2, atol=2e-3)
            expected = s.labels(tuple(MEMBERS), cid)
            top2 = np.sort(oof[0] + oof[1], 0)[-2:]
            clear = top2[1] - top2[0] > 4e-3  # float16 roundings (OOF files, the buffer) may flip near-ties
            assert clear.mean() > 0.95
            assert np.array_equal(seg[clear], expected[clear]), cid
            assert len(set(np.unique(expected))) > 1  # the case is not trivial


def test_predict_uses_the_selected_ensemble_and_its_rules_and_says_so(ensemble, tmp_path, capsys):
    ds, work = ensemble
    plans = Plans.load(work / "plans.json")
    assert Workdir(work).model(plans) == MEMBERS and Workdir(work).model(plans, "2d") == ["2d"]
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--mirror", "off"]) == 0
    err = capsys.readouterr().err
    assert "ensemble 3d_lowres (folds 0,1) + 2d (folds 0,1), 1 post-processing rule" in err, err
    p = Predictor.from_workdir(work, mirror="off", postprocessing=())
    for img in input_files(ds):
        raw, _ = p.predict_case(*read_image(img))
        written, g = read_label(out / img.name.replace("_0000", ""))
        assert np.array_equal(written, apply_postprocessing(raw, [{"rule": "largest_component", "classes": [1]}],
                                                            g.spacing))


def test_config_forces_one_configuration_with_its_own_rules(ensemble, tmp_path, capsys):
    ds, work = ensemble
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--mirror", "off", "--config", "2d"]) == 0
    assert "configuration 2d (folds 0,1), 0 post-processing rules" in capsys.readouterr().err
    p = Predictor.from_workdir(work, configuration="2d", mirror="off")
    assert [m.name for m in p.members] == ["2d"] and p.postprocessing == []
    img = input_files(ds)[0]
    written, _ = read_label(out / img.name.replace("_0000", ""))
    assert np.array_equal(written, p.predict_case(*read_image(img))[0])
    selection = Workdir(work).load_selection()
    assert selection.rules_for(MEMBERS) == [{"rule": "largest_component", "classes": [1]}]
    assert selection.rules_for(["2d"]) == []


def test_the_bundle_carries_every_member_and_predicts_the_ensemble_bit_for_bit(ensemble, tmp_path):
    ds, work = ensemble
    bundle = load_bundle(pack_bundle(work, tmp_path / "model.autoseg"))
    assert bundle.manifest["ensemble"] == MEMBERS and sorted(bundle.weights) == sorted(MEMBERS)
    assert all(sorted(bundle.weights[c]) == [0, 1] for c in MEMBERS)
    assert bundle.manifest["postprocessing"] == [{"rule": "largest_component", "classes": [1]}]
    img = input_files(ds)[1]
    images, geometry = read_image(img)
    from_bundle = bundle.predictor(mirror="off")
    assert [m.name for m in from_bundle.members] == MEMBERS
    expected = Predictor.from_workdir(work, mirror="off").predict_case(images, geometry)[0]
    assert np.array_equal(from_bundle.predict_case(images, geometry)[0], expected)
    one = bundle.predictor("2d", mirror="off")
    assert [m.name for m in one.members] == ["2d"] and one.postprocessing == []
    alone = load_bundle(pack_bundle(work, tmp_path / "one.autoseg", configuration="2d"))
    assert alone.manifest["ensemble"] == ["2d"] and list(alone.weights) == ["2d"]
