"""One inference engine: a held-out case's out-of-fold label map (predicted from the preprocessed cache after its
fold trained) and ``autoseg predict`` of the same raw image with the same fold are the same, voxel for voxel,
for a 3D configuration, a 2D configuration and an ensemble, post-processing included.

Models are random-init folds (what is tested is that the paths are one, not that a model learned anything).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_ensemble_predict import HELD_OUT, MEMBERS, ensemble  # noqa: F401  (the fixture)
from test_predict import ct  # noqa: F401  (the fixture)

from autoseg.cli import run
from autoseg.fingerprint import extract_fingerprint
from autoseg.io import read_label
from autoseg.oof import predict_fold_validation
from autoseg.postprocess import apply_postprocessing
from autoseg.preprocess import preprocess
from autoseg.select import find_oof
from autoseg.workdir import Workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def predict_cli(work: Path, image: Path, out: Path, fold: int, *extra: str) -> tuple[np.ndarray, np.ndarray]:
    """``autoseg predict WORK IMAGE OUT --folds FOLD --mirror off --save-probabilities``: labels and maps."""
    assert run(["-q", "predict", str(work), str(image), str(out), "--folds", str(fold), "--mirror", "off",
                "--save-probabilities", *extra]) == 0
    case = image.name.replace("_0000.nii.gz", "")
    with np.load(out / f"{case}.npz") as f:
        return read_label(out / f"{case}.nii.gz")[0], f["probabilities"]


def oof_outputs(work: Path, configuration: str, fold: int, case: str) -> tuple[np.ndarray, np.ndarray]:
    run_dir = Workdir(work).run(configuration, fold)
    with np.load(run_dir.oof_probabilities(case)) as f:
        return read_label(run_dir.oof_labels(case, ".nii.gz"))[0], f["probabilities"]


def test_3d_out_of_fold_labels_and_autoseg_predict_of_the_same_fold_are_identical(ct, tmp_path):  # noqa: F811
    ds, work, plans = ct
    work2 = Path(shutil.copytree(work, tmp_path / "work"))
    preprocess(ds, work2, plans, extract_fingerprint(ds, jobs=1), jobs=1)
    case = "ctaniso_000"
    predict_fold_validation(work2, ds, plans, "3d_fullres", 0, [case])
    oof_seg, oof_maps = oof_outputs(work2, "3d_fullres", 0, case)
    seg, maps = predict_cli(work2, ds / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "out", 0)
    assert len(np.unique(oof_seg)) > 1  # not a trivial case
    assert np.array_equal(seg, oof_seg) and np.array_equal(maps, oof_maps)
    assert np.array_equal(oof_seg, oof_maps.argmax(0))  # the stored maps are what the labels are the argmax of


def test_2d_out_of_fold_labels_and_autoseg_predict_of_the_same_fold_are_identical(ensemble, tmp_path):  # noqa: F811
    ds, work = ensemble
    for fold, cases in HELD_OUT.items():
        for case in cases:
            oof_seg, oof_maps = oof_outputs(work, "2d", fold, case)
            seg, maps = predict_cli(work, ds / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / f"{case}", fold,
                                    "--config", "2d")  # selection.json tuned no rule for 2d alone
            assert np.array_equal(seg, oof_seg) and np.array_equal(maps, oof_maps), case


def test_ensemble_labels_the_selection_scored_and_autoseg_predict_are_identical(ensemble, tmp_path):  # noqa: F811
    """The selection's label map of the ensemble (its members' out-of-fold maps summed) with the rules it tuned,
    and ``autoseg predict`` of the workdir (the selected ensemble and its rules) with the fold that held the case
    out."""
    from autoseg.select import _Scorer

    ds, work = ensemble
    selection = Workdir(work).load_selection()
    rules = selection.rules_for(MEMBERS)
    assert selection.ensemble == MEMBERS and rules  # the fixture's ensemble, with a rule to apply
    refs = {p.name.replace(".nii.gz", ""): p for p in (ds / "labelsTr").glob("*.nii.gz")}
    scorer = _Scorer(find_oof(work), refs, [1, 2], None, ".nii.gz")
    for fold, cases in HELD_OUT.items():
        for case in cases:
            ref_spacing = scorer.reference(case)[1]
            expected = apply_postprocessing(scorer.labels(tuple(MEMBERS), case), rules, ref_spacing)
            seg, _ = predict_cli(work, ds / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / f"{case}", fold)
            assert len(np.unique(expected)) > 1 and np.array_equal(seg, expected), case


def test_class_weights_the_selection_tuned_are_applied_by_autoseg_predict_as_scored(ensemble, tmp_path):  # noqa: F811
    """A ``class_weights`` rule in front of the ensemble's rules: ``autoseg predict`` multiplies the class's summed
    probabilities before the argmax exactly as the selection's scorer does on the out-of-fold files."""
    import json

    from autoseg.postprocess import split_weights
    from autoseg.select import _Scorer

    ds, work = ensemble
    work = Path(shutil.copytree(work, tmp_path / "work"))
    selection = json.loads((work / "selection.json").read_text())
    rules = [{"rule": "class_weights", "classes": [2], "factors": [6.0]}] + selection["postprocessing_by_model"]["+".join(MEMBERS)]
    selection["postprocessing"] = selection["postprocessing_by_model"]["+".join(MEMBERS)] = rules
    (work / "selection.json").write_text(json.dumps(selection))
    weights, label_rules = split_weights(rules)
    refs = {p.name.replace(".nii.gz", ""): p for p in (ds / "labelsTr").glob("*.nii.gz")}
    scorer = _Scorer(find_oof(work), refs, [1, 2], None, ".nii.gz")
    changed = 0
    for fold, cases in HELD_OUT.items():
        for case in cases:
            spacing = scorer.reference(case)[1]
            plain = apply_postprocessing(scorer.labels(tuple(MEMBERS), case), label_rules, spacing)
            expected = apply_postprocessing(scorer.labels(tuple(MEMBERS), case, weights=weights), label_rules, spacing)
            seg, maps = predict_cli(work, ds / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / f"{case}", fold)
            assert np.array_equal(seg, expected), case
            if not changed:  # the bundle carries the rule: the same label map from model.autoseg
                assert run(["-q", "bundle", str(work)]) == 0
                from_bundle, _ = predict_cli(work / "model.autoseg", ds / "imagesTr" / f"{case}_0000.nii.gz",
                                             tmp_path / f"{case}_bundle", fold)
                assert np.array_equal(from_bundle, expected), case
            changed += int((expected != plain).sum())
            assert (seg == 2).sum() >= (plain == 2).sum()  # the factor only ever adds to its class
    assert changed > 0  # the factor moved voxels: the test compares something


# --- a region model (BraTS-like): sigmoid per region, painted in regions_class_order ----------------------

REGION_HELD_OUT = {0: ["bratslike_000"], 1: ["bratslike_001", "bratslike_002"]}
REGION_MEMBERS = ["3d_fullres", "2d"]


def predict_region_case(ds: Path, case: str, tmp_path: Path, fold: int, *extra: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_cli` of a four-channel case: its channel files in a folder of their own."""
    images = tmp_path / f"{case}_in"
    images.mkdir()
    for f in (ds / "imagesTr").glob(f"{case}_000?.nii.gz"):
        shutil.copy(f, images / f.name)
    assert run(["-q", "predict", str(work_of(ds)), str(images), str(tmp_path / case), "--folds", str(fold),
                "--mirror", "off", "--save-probabilities", *extra]) == 0
    with np.load(tmp_path / case / f"{case}.npz") as f:
        return read_label(tmp_path / case / f"{case}.nii.gz")[0], f["probabilities"]


def work_of(ds: Path) -> Path:
    return ds.parent / "work"


@pytest.fixture(scope="module")
def regions(tmp_path_factory) -> tuple[Path, Path]:
    """brats-like with a 3D and a 2D configuration, two random folds each, their out-of-fold outputs from the
    real validation code, and a selection forced to the ensemble of both with a region rule."""
    import json
    from dataclasses import replace

    from test_predict import hand_plans, save_random_folds

    from autoseg.select import select_model
    from autoseg.synth import generate
    from autoseg.workdir import SELECTION_FILE

    root = tmp_path_factory.mktemp("regions")
    ds = generate("brats-like", root / "ds", size="tiny", cases=3, seed=2)
    fp = extract_fingerprint(ds, jobs=1)
    full = hand_plans(fp, "3d_fullres", 3, [16, 16, 16], [1, 2])
    flat = hand_plans(fp, "2d", 2, [16, 16], [0, 1]).configurations["2d"]
    plans = replace(full, configurations={"3d_fullres": full.configurations["3d_fullres"], "2d": flat},
                    train_runs=[{"configuration": c, "fold": k, "seconds": 1.0} for c in REGION_MEMBERS for k in (0, 1)])
    work = root / "work"
    plans.save(work / "plans.json")
    fp.save(work / "fingerprint.json")
    for c in REGION_MEMBERS:
        save_random_folds(work, plans, c)
    preprocess(ds, work, plans, fp, jobs=1)
    for c in REGION_MEMBERS:
        for k, cases in REGION_HELD_OUT.items():
            predict_fold_validation(work, ds, plans, c, k, cases)
    selection = select_model(work, ds, postprocessing=False).to_dict()
    rule = [{"rule": "largest_component", "classes": [1, 2, 3]}]  # the whole tumour region's
    selection.update(configuration=REGION_MEMBERS[0], ensemble=REGION_MEMBERS, postprocessing=rule,
                     postprocessing_by_model={"+".join(REGION_MEMBERS): rule, REGION_MEMBERS[0]: []})
    (work / SELECTION_FILE).write_text(json.dumps(selection))
    return ds, work


def test_region_out_of_fold_labels_and_autoseg_predict_of_the_same_fold_are_identical(regions, tmp_path):
    from autoseg.regions import regions_to_labels

    ds, work = regions
    for fold, cases in REGION_HELD_OUT.items():
        for case in cases:
            oof_seg, oof_maps = oof_outputs(work, "3d_fullres", fold, case)
            seg, maps = predict_region_case(ds, case, tmp_path, fold, "--config", "3d_fullres")
            assert maps.shape[0] == 3  # one map per region, no background
            assert np.array_equal(seg, oof_seg) and np.array_equal(maps, oof_maps), case
            assert np.array_equal(oof_seg, regions_to_labels(oof_maps.astype(np.float32), [1, 2, 3]))
            assert len(np.unique(oof_seg)) > 1


def test_region_ensemble_the_selection_scored_and_autoseg_predict_are_identical(regions, tmp_path):
    from autoseg.select import _Scorer

    ds, work = regions
    selection = Workdir(work).load_selection()
    rules = selection.rules_for(REGION_MEMBERS)
    assert selection.ensemble == REGION_MEMBERS and rules
    assert list(selection.classes.values()) == ["whole tumour", "tumour core", "enhancing tumour"]
    refs = {p.name.replace(".nii.gz", ""): p for p in (ds / "labelsTr").glob("*.nii.gz")}
    scorer = _Scorer(find_oof(work), refs, [(1, 2, 3), (2, 3), (3,)], None, ".nii.gz", [1, 2, 3])
    for fold, cases in REGION_HELD_OUT.items():
        for case in cases:
            expected = apply_postprocessing(scorer.labels(tuple(REGION_MEMBERS), case), rules,
                                            scorer.reference(case)[1])
            seg, _ = predict_region_case(ds, case, tmp_path, fold)
            assert len(np.unique(expected)) > 1 and np.array_equal(seg, expected), case


def test_a_search_trial_of_a_region_model_scores_the_mean_region_dice(regions):
    """The search's objective goes through the same engine and the same scored classes: for a region dataset,
    the mean over regions of the held-out cases' Dice (here: of the out-of-fold label maps the engine wrote)."""
    from autoseg.metrics import dice_per_class
    from autoseg.search.trial import score_trial

    ds, work = regions
    w = Workdir(work)
    plans = w.load_plans()
    cases = REGION_HELD_OUT[1]
    score = score_trial(w.run("3d_fullres", 1), w, ds, plans, "3d_fullres", 1, cases, "cpu")
    per_region: dict = {r: [] for r in plans.scored_classes}
    for case in cases:
        seg, _ = oof_outputs(work, "3d_fullres", 1, case)
        ref, _ = read_label(ds / "labelsTr" / f"{case}.nii.gz")
        for r, d in dice_per_class(seg, ref, list(per_region)).items():
            per_region[r].append(d)
    assert list(per_region) == [(1, 2, 3), (2, 3), (3,)]
    assert score == pytest.approx(np.mean([np.nanmean(v) for v in per_region.values()]))


def test_scoring_held_out_cases_stops_before_writing_once_the_claim_is_lost(ct, tmp_path):  # noqa: F811
    """A worker whose run was taken over while it scored the held-out cases writes nothing more (issue 23)."""
    from autoseg.claims import ClaimLost

    ds, work, plans = ct
    work2 = Path(shutil.copytree(work, tmp_path / "work"))
    preprocess(ds, work2, plans, extract_fingerprint(ds, jobs=1), jobs=1)
    run_dir = Workdir(work2).run("3d_fullres", 0)
    shutil.rmtree(run_dir.validation, ignore_errors=True)
    calls = []

    def verify() -> None:  # held for the first case, taken over before the second
        calls.append(1)
        if len(calls) > 1:
            raise ClaimLost("taken over")

    with pytest.raises(ClaimLost):
        predict_fold_validation(work2, ds, plans, "3d_fullres", 0, ["ctaniso_000", "ctaniso_001"],
                                before_write=verify)
    assert run_dir.oof_probabilities("ctaniso_000").is_file()
    assert not run_dir.oof_probabilities("ctaniso_001").is_file()
    assert not run_dir.validation_summary.is_file()
