"""The per-case quality flag (autoseg.quality): each input check, the output check, the model's confidence and
disagreement measures, the calibration on out-of-fold cases, and end to end: a tiny trained model flags shifted
inputs (orientation, 3x spacing, heavy noise, another modality's intensities) and not a normal case, and
``autoseg predict`` writes quality.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset

from autoseg.cli import run
from autoseg.ensemble import Member, member_probabilities
from autoseg.fingerprint import extract_fingerprint
from autoseg.io import Geometry, read_image, write_image
from autoseg.nets import build_network
from autoseg.plan import rules
from autoseg.quality import (
    ClassRange,
    Envelope,
    ModelFeatures,
    QualityModel,
    assess,
    calibrate,
    class_confidence,
    class_ranges,
    foreground_entropy,
    input_checks,
    input_features,
    orientation_code,
    output_checks,
    pairwise_dice,
    score_of,
)
from autoseg.schema.fingerprint import CaseFingerprint, ClassStats
from autoseg.schema.plans import Augmentation, Configuration, Network, Optimizer, Plans, Schedule
from autoseg.schema.selection import Selection
from autoseg.workdir import Workdir
from autoseg.workflow import train_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 100
IDENTITY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist()))


def _image(seed: int, shape=(16, 16, 16), offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 1, (1, *shape)).astype(np.float32)
    img[0, 4:12, 4:12, 4:12] += 3
    return img + offset


def _envelope() -> Envelope:
    return Envelope.of([input_features(_image(s), IDENTITY) for s in range(4)])


def _failed(checks) -> set[str]:
    return {c.name for c in checks if not c.ok}


def test_orientation_code_names_axis_and_sign():
    assert orientation_code(np.eye(3).ravel(), 3) == "+x+y+z"
    assert orientation_code(np.diag([-1.0, 1, 1]).ravel(), 3) == "-x+y+z"
    swapped = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    assert orientation_code(swapped.ravel(), 3) == "+y+x+z"
    assert orientation_code(np.eye(2).ravel(), 2) == "+x+y"


def test_input_like_training_passes_every_check():
    assert _failed(input_checks(input_features(_image(9), IDENTITY), _envelope())) == set()


def test_spacing_three_times_coarser_fails_spacing_check():
    coarse = Geometry((3.0, 3.0, 3.0), IDENTITY.origin, IDENTITY.direction)
    assert _failed(input_checks(input_features(_image(9), coarse), _envelope())) == {"spacing"}


def test_size_far_beyond_training_fails_size_check():
    assert "size" in _failed(input_checks(input_features(_image(9, shape=(16, 16, 64)), IDENTITY), _envelope()))


def test_flipped_orientation_fails_orientation_check():
    flipped = Geometry(IDENTITY.spacing, IDENTITY.origin, tuple(np.diag([1.0, -1, 1]).ravel().tolist()))
    assert _failed(input_checks(input_features(_image(9), flipped), _envelope())) == {"orientation"}


def test_other_intensities_and_heavy_noise_fail_intensity_check():
    env = _envelope()
    assert _failed(input_checks(input_features(_image(9, offset=500.0), IDENTITY), env)) == {"intensity"}
    noisy = _image(9) + np.random.default_rng(1).normal(0, 10, (1, 16, 16, 16)).astype(np.float32)
    assert _failed(input_checks(input_features(noisy, IDENTITY), env)) == {"intensity"}


def test_channel_count_and_dimensions_are_checked():
    env = _envelope()
    two = input_features(np.concatenate([_image(9), _image(8)]), IDENTITY)
    assert "channels" in _failed(input_checks(two, env))
    flat = input_features(_image(9)[:, 0], Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    assert "dimensions" in _failed(input_checks(flat, env))


def test_output_check_flags_missing_and_oversized_structures():
    ranges = {"1": ClassRange("organ", 1.0, 100.0, 200.0), "2": ClassRange("lesion", 0.3, 1.0, 10.0)}
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[:5, :5, :5] = 1  # 125 mm3: within
    assert _failed(output_checks(seg, (1.0, 1.0, 1.0), ranges)) == set()  # a rare lesion may be absent
    assert _failed(output_checks(np.zeros_like(seg), (1.0, 1.0, 1.0), ranges)) == {"structures"}  # organ missing
    seg[:, :, :] = 1  # 1000 mm3: over 3x the 95th percentile
    assert _failed(output_checks(seg, (1.0, 1.0, 1.0), ranges)) == {"structures"}


def _liver() -> tuple[dict[str, ClassRange], np.ndarray]:
    """A structure trained at 0.21-0.38 of axis 2 (one side of the body) and centred on the other axes, and a
    prediction of it where training had it."""
    ranges = {"1": ClassRange("liver", 0.5, 1.0, 1e6, [0.4, 0.4, 0.21], [0.6, 0.6, 0.38])}
    seg = np.zeros((10, 10, 20), np.uint8)
    seg[3:7, 3:7, 4:8] = 1  # centroid (4.5, 4.5, 5.5) + 0.5 over the shape: 0.5, 0.5, 0.3
    return ranges, seg


def test_position_check_passes_a_structure_where_training_had_it():
    ranges, seg = _liver()
    checks = output_checks(seg, (1.0, 1.0, 1.0), ranges)
    assert [c.name for c in checks] == ["structures", "position"] and _failed(checks) == set()
    assert _failed(output_checks(seg[::-1].copy(), (1.0, 1.0, 1.0), ranges)) == set()  # mirrored where it is centred
    shifted = np.roll(seg, 2, axis=2)  # 0.4: beyond 0.38 but within the tolerance
    assert _failed(output_checks(shifted, (1.0, 1.0, 1.0), ranges)) == set()


def test_position_check_fails_an_array_flipped_along_the_sided_axis():
    ranges, seg = _liver()
    checks = output_checks(seg[:, :, ::-1].copy(), (1.0, 1.0, 1.0), ranges)
    assert _failed(checks) == {"position"}
    assert checks[-1].detail == "liver centroid at 0.70 of axis 2, training 0.21-0.38"
    q = calibrate([0.9, 0.8], [0.9, 0.95], _envelope(), ranges, min_dice=0.5)
    verdict = assess(q, input_features(_image(9), IDENTITY), ModelFeatures(0.9, {"1": 0.9}, 0.1, 0.95, None),
                     np.ascontiguousarray(np.pad(seg, ((3, 3), (3, 3), (0, 0)))[:, :, ::-1]), (1.0, 1.0, 1.0))
    assert verdict.flagged and verdict.reasons == ["position: liver centroid at 0.70 of axis 2, training 0.21-0.38"]
    assert json.loads(json.dumps(verdict.to_dict()))["checks"][-1]["name"] == "position"


def test_position_check_leaves_an_absent_structure_to_the_volume_check():
    ranges, seg = _liver()
    ranges["2"] = ClassRange("tumour", 0.95, 1.0, 1e6, [0.0, 0.0, 0.9], [0.1, 0.1, 1.0])
    checks = output_checks(seg, (1.0, 1.0, 1.0), ranges)
    assert _failed(checks) == {"structures"} and "tumour missing" in checks[0].detail


def test_quality_without_positions_loads_and_skips_the_position_check():
    ranges, seg = _liver()
    q = calibrate([0.9, 0.8], [0.9, 0.95], _envelope(), ranges, min_dice=0.5)
    old = q.to_dict()
    for c in old["classes"].values():  # a calibration made before positions were kept
        del c["position_min"], c["position_max"]
    loaded = QualityModel.from_dict(json.loads(json.dumps(old)))
    assert loaded.classes["1"].position_min is None and loaded.classes["1"].position_max is None
    checks = output_checks(seg[:, :, ::-1].copy(), (1.0, 1.0, 1.0), loaded.classes)
    assert [c.name for c in checks] == ["structures"] and _failed(checks) == set()
    wrong_dims = {"1": ClassRange("liver", 0.5, 1.0, 1e6, [0.4, 0.4], [0.6, 0.6])}  # a 2D range on a 3D image
    assert [c.name for c in output_checks(seg, (1.0, 1.0, 1.0), wrong_dims)] == ["structures"]


def test_positions_round_trip_through_the_quality_dict():
    ranges, _ = _liver()
    q = calibrate([0.9, 0.8], [0.9, 0.95], _envelope(), ranges, min_dice=0.5)
    again = QualityModel.from_dict(json.loads(json.dumps(q.to_dict())))
    assert again.classes == q.classes and again.to_dict() == q.to_dict()
    assert again.classes["1"].position_min == [0.4, 0.4, 0.21]


def test_class_ranges_take_the_positions_from_the_fingerprint_cases():
    def case(cid: str, voxels: dict, centroids: dict) -> CaseFingerprint:
        return CaseFingerprint(cid, [1.0] * 3, [10] * 3, [10] * 3, [[0, 10]] * 3, "h", class_voxels=voxels,
                               class_centroid=centroids)

    stats = [ClassStats(v, n, 2, {}, {"p5": 1.0, "p95": 9.0}, {}, {}) for v, n in ((1, "liver"), (2, "spleen"))]
    cases = [case("a", {"1": 5, "2": 3}, {"1": [0.5, 0.4, 0.2], "2": [0.5, 0.5, 0.8]}),
             case("b", {"1": 5, "2": 3}, {"1": [0.6, 0.5, 0.3], "2": [0.4, 0.5, 0.7]}),
             case("c", {}, {})]  # neither present: not counted
    ranges = class_ranges(SimpleNamespace(cases=cases, classes=stats))
    assert ranges["1"].position_min == [0.5, 0.4, 0.2] and ranges["1"].position_max == [0.6, 0.5, 0.3]
    assert ranges["2"].position_min == [0.4, 0.5, 0.7] and ranges["2"].position_max == [0.5, 0.5, 0.8]
    older = [case("a", {"1": 5}, {}), case("b", {"1": 5}, {})]  # a fingerprint written before centroids
    assert class_ranges(SimpleNamespace(cases=older, classes=stats[:1]))["1"].position_min is None


def test_a_side_labelled_structure_flipped_fails_the_position_check(tmp_path: Path):
    """kidneys-lr labels each kidney by its side (axis 2): a training label passes against the fingerprint's
    ranges; the same label map flipped left-right fails, naming both kidneys on axis 2."""
    from autoseg.io import read_label
    from autoseg.synth import generate

    root = generate("kidneys-lr", tmp_path / "k", size="tiny")
    fp = extract_fingerprint(root, jobs=1)
    ranges = class_ranges(fp)
    label, geometry = read_label(sorted((root / "labelsTr").glob("*.nii.gz"))[0])
    assert _failed(output_checks(label, geometry.spacing, ranges)) == set()
    flipped = output_checks(np.ascontiguousarray(label[:, :, ::-1]), geometry.spacing, ranges)
    assert _failed(flipped) == {"position"}
    lines = flipped[-1].detail.split("; ")
    assert {line.split(" centroid")[0] for line in lines} == {c.name for c in fp.classes}
    assert all(" of axis 2, " in line for line in lines)


def test_confidence_is_one_for_certain_maps_and_lower_for_unsure_ones():
    sure = np.zeros((2, 8, 8, 8), np.float32)
    sure[0], sure[1, 2:6, 2:6, 2:6], sure[0, 2:6, 2:6, 2:6] = 1, 1, 0
    assert class_confidence(sure)[1] == pytest.approx(1.0)
    assert foreground_entropy(sure) == pytest.approx(0.0, abs=1e-3)
    unsure = 0.4 * sure + 0.3
    assert class_confidence(unsure)[1] < 0.8
    assert foreground_entropy(unsure) > 0.5
    empty = np.stack([np.ones((8, 8, 8)), np.zeros((8, 8, 8))]).astype(np.float32)
    assert class_confidence(empty)[1] is None
    assert score_of({1: None}, expected=[1]) == 0.0 and score_of({1: None}) == 1.0
    regions = np.stack([sure[1], sure[1] * 0.6]).astype(np.float32)  # sigmoid maps, one per region
    assert set(class_confidence(regions, sigmoid=True)) == {0, 1}


def test_pairwise_dice_of_label_maps():
    a = torch.zeros(8, 8, dtype=torch.uint8)
    a[:4] = 1
    b = torch.zeros_like(a)
    b[4:] = 1
    assert pairwise_dice([a, a.clone()], 2) == 1.0
    assert pairwise_dice([a, b], 2) == 0.0
    assert pairwise_dice([a], 2) is None


def test_calibration_threshold_separates_cases_below_min_dice():
    dices = [0.95, 0.93, 0.9, 0.92, 0.5, 0.4, 0.94, 0.91]
    scores = [0.9, 0.88, 0.86, 0.87, 0.6, 0.55, 0.9, 0.85]
    q = calibrate(scores, dices, _envelope(), min_dice=0.8)
    assert 0.6 < q.threshold <= 0.85
    assert q.calibration["worst_flagged"] == 2 and q.calibration["flagged_above_min_dice"] == 0
    assert q.calibration["spearman_score_dice"] > 0.8
    assert calibrate(scores, dices, _envelope()).min_dice == pytest.approx(np.median(dices) - 0.05)
    none_low = calibrate([0.9, 0.8], [0.9, 0.95], _envelope(), min_dice=0.5)
    assert none_low.threshold == pytest.approx(0.8 - 0.05)


def test_calibration_falls_back_when_the_score_does_not_rank_the_dice():
    dices = [0.1, 0.3, 0.25, 0.2, 0.22, 0.19]
    scores = [0.30, 0.24, 0.29, 0.27, 0.32, 0.29]  # the worst case has a high score: no separation
    q = calibrate(scores, dices, _envelope(), min_dice=0.15)
    assert q.threshold == pytest.approx(0.24 - 0.05) and q.calibration["flagged"] == 0
    assert "does not rank" in q.calibration["rule"]


def test_assess_flags_a_low_score_a_failed_check_and_disagreeing_folds():
    from autoseg.quality import ModelFeatures

    q = calibrate([0.9, 0.8], [0.9, 0.95], _envelope(), {"1": ClassRange("box", 1.0, 100.0, 1000.0)}, min_dice=0.5)
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[4:12, 4:12, 4:12] = 1
    good = ModelFeatures(0.9, {"1": 0.9}, 0.1, 0.95, None)
    assert not assess(q, input_features(_image(9), IDENTITY), good, seg, (1.0, 1.0, 1.0)).flagged
    low = ModelFeatures(0.5, {"1": 0.5}, 0.6, 0.95, None)
    verdict = assess(q, input_features(_image(9), IDENTITY), low, seg, (1.0, 1.0, 1.0))
    assert verdict.flagged and verdict.reasons[0].startswith("score 0.500 <")
    split = ModelFeatures(0.9, {"1": 0.9}, 0.1, 0.3, None)
    assert assess(q, input_features(_image(9), IDENTITY), split, seg, (1.0, 1.0, 1.0)).reasons == [
        "folds agree at Dice 0.300 < 0.500"]
    shifted = assess(q, input_features(_image(9, offset=500.0), IDENTITY), good, seg, (1.0, 1.0, 1.0))
    assert shifted.flagged and shifted.reasons[0].startswith("intensity:")
    assert json.loads(json.dumps(shifted.to_dict()))["checks"][-2]["name"] == "intensity"


def test_fold_labels_leave_the_fold_mean_unchanged():
    cfg = Configuration(name="3d", ndim=3, spacing=[1.0] * 3, median_shape=[16] * 3, patch_size=[8, 8, 8],
                        batch_size=2, normalization=[], resampling={},
                        network=Network("unet", [4, 8], [[3] * 3] * 2, [[1] * 3, [2] * 3], [1, 1], decoder_convs=1))
    plans = Plans("D", "h", "test", {"type": "cpu"}, 1.0, {"3d": cfg}, axis_order=[0, 1, 2], channel_names=["MRI"],
                  labels={"background": 0, "a": 1}, folds=2)
    weights = []
    for k in range(2):
        torch.manual_seed(k)
        weights.append(build_network(cfg.network, 1, 2, 3).state_dict())
    member = Member("3d", cfg, weights, [0, 1])
    data = _image(3)
    options = dict(mirror_axes=(), overlap=0.5, tile_batch=2, precision="fp32")
    plain = member_probabilities(member, plans, data, torch.device("cpu"), **options)
    folds: list[torch.Tensor] = []
    kept = member_probabilities(member, plans, data, torch.device("cpu"), fold_labels=folds, **options)
    assert torch.equal(plain, kept)
    assert len(folds) == 2 and folds[0].shape == data.shape[1:]


# --- end to end ----------------------------------------------------------------------------------------------


def _train(root: Path) -> tuple[Path, Workdir]:
    ds = write_tiny_dataset(root / "Dataset001_Tiny", cases=6, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0),
                            labels={"background": 0, "box": 1})
    fp = extract_fingerprint(ds, jobs=1)
    spacing = rules.target_spacing(fp)
    net = Network("unet", [4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], decoder_convs=1)
    cfg = Configuration(name="3d_fullres", ndim=3, spacing=spacing, median_shape=fp.median_cropped_shape,
                        patch_size=[16, 16, 16], batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling(spacing), network=net, optimizer=Optimizer("adamw", 1e-2),
                        augmentation=Augmentation(rotation_deg=0, scale=[1.0, 1.0], noise=0, blur=0, brightness=0,
                                                  contrast=0, gamma=0, low_resolution=0),
                        schedule=Schedule(steps=STEPS, val_every=STEPS))
    plans = Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {"3d_fullres": cfg},
                  axis_order=[0, 1, 2], channel_names=fp.channel_names, labels=fp.labels, file_ending=fp.file_ending,
                  folds=2, train_runs=[{"configuration": "3d_fullres", "fold": k, "seconds": 1.0} for k in (0, 1)])
    work = Workdir(root / "work")
    work.save_plans(plans)
    work.save_fingerprint(fp)
    result = train_dataset(ds, work.root, fold="all", steps=STEPS, workers=0, device="cpu", progress=False,
                           min_dice=0.5)
    assert result.selection is not None, result.selection_error
    return ds, work


@pytest.mark.slow
def test_shifted_inputs_flagged_and_normal_case_not(tmp_path: Path, capsys):
    ds, work = _train(tmp_path)
    selection = Selection.load(work.selection_file)
    assert selection.quality and selection.quality["min_dice"] == 0.5
    assert selection.quality["calibration"]["cases"] == 6
    assert run(["-q", "select", str(ds), "-w", str(work.root), "--min-dice", "0.6"]) == 0  # recalibrated
    assert Selection.load(work.selection_file).quality["min_dice"] == 0.6
    manifest_quality = json.loads(__import__("zipfile").ZipFile(work.bundle_file).read("manifest.json"))["quality"]
    assert manifest_quality["min_dice"] == 0.5  # the bundle keeps the calibration it was packed with

    test = tmp_path / "test"
    fresh = write_tiny_dataset(tmp_path / "fresh", cases=1, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=7,
                               labels={"background": 0, "box": 1})
    normal, geometry = read_image(fresh / "imagesTr" / "case000_0000.nii.gz")
    normal = normal.reshape(normal.shape[-3:])
    write_image(normal, geometry, test / "normal_0000.nii.gz")
    flipped = Geometry(geometry.spacing, geometry.origin, tuple(np.diag([-1.0, 1, 1]).ravel().tolist()))
    write_image(normal[::-1].copy(), flipped, test / "flipped_0000.nii.gz")
    write_image(normal, Geometry(tuple(3 * s for s in geometry.spacing), geometry.origin, geometry.direction),
                test / "spacing3x_0000.nii.gz")
    noise = np.random.default_rng(0).normal(0, 8, normal.shape).astype(np.float32)
    write_image(normal + noise, geometry, test / "noise_0000.nii.gz")
    write_image(normal * 200 + 1000, geometry, test / "modality_0000.nii.gz")

    for model in (work.bundle_file, work.root):
        out = tmp_path / f"out_{Path(model).name}"
        assert run(["-q", "predict", str(model), str(test), str(out), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        report = json.loads((out / "quality.json").read_text())
        assert set(report["cases"]) == {"normal", "flipped", "spacing3x", "noise", "modality"}
        flags = {case: entry["flagged"] for case, entry in report["cases"].items()}
        assert flags == {"normal": False, "flipped": True, "spacing3x": True, "noise": True, "modality": True}, report
        assert all("position" in {c["name"] for c in entry["checks"]} for entry in report["cases"].values())
        assert "4 of 5 case(s) flagged" in printed and "FLAGGED" in printed

    refs = tmp_path / "refs"  # the report of `autoseg evaluate` shows each case's score and flag
    refs.mkdir()
    for case in ("normal", "noise", "modality"):
        shutil.copy(fresh / "labelsTr" / "case000.nii.gz", refs / f"{case}.nii.gz")
    assert run(["-q", "evaluate", str(out), str(refs), "--report"]) == 0
    page = (out / "report.html").read_text()
    assert "quality score" in page and "Quality flag" in page and "intensity:" in page
