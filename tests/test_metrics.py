"""Metrics: every score against hand-computed cases (anisotropic spacing included), every empty-mask
convention, the cropping, and agreement with independent implementations (brute-force surface distances;
medpy when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from autoseg import metrics
from autoseg.metrics import (
    binary_metrics,
    border,
    compute_metrics,
    dice,
    dice_per_class,
    hd95_from_distances,
    resolve_tolerances,
    surface_distances,
)

nan = math.nan


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# --- the two functions oof.py relies on ----------------------------------------------------------------


def test_dice_and_dice_per_class_keep_their_behaviour():
    ref = np.array([0, 1, 1, 2, 3, 3])
    pred = np.array([0, 1, 0, 2, 2, 1])
    assert dice(pred == 1, ref == 1) == pytest.approx(2 * 1 / 4)
    assert math.isnan(dice(pred == 9, ref == 9))
    # the ignore label (3) leaves its voxels out: class 1 keeps 1 TP, 1 FN; class 2 keeps 1 TP
    assert dice_per_class(pred, ref, [1, 2], ignore=3) == {1: pytest.approx(2 / 3), 2: 1.0}


# --- hand-computed overlap -------------------------------------------------------------------------------


def _square_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 3x3 square in a 6x6 image, and the same square one row lower."""
    ref = np.zeros((6, 6), np.uint8)
    ref[1:4, 1:4] = 1
    pred = np.zeros_like(ref)
    pred[2:5, 1:4] = 1
    return pred, ref


def test_overlap_scores_and_volumes_match_hand_counts():
    pred, ref = _square_pair()
    m = compute_metrics(pred, ref, {"sq": 1}, spacing=(2.0, 1.0))["sq"]
    # TP = 6 (rows 2-3), FP = 3 (row 4), FN = 3 (row 1), TN = 36 - 12 = 24
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (6, 3, 3, 24)
    assert m["dice"] == pytest.approx(12 / 18)
    assert m["iou"] == pytest.approx(6 / 12)
    assert m["sensitivity"] == pytest.approx(6 / 9)
    assert m["precision"] == pytest.approx(6 / 9)
    assert m["specificity"] == pytest.approx(24 / 27)
    assert m["volume_ref_mm3"] == m["volume_pred_mm3"] == pytest.approx(9 * 2.0)  # 9 pixels of 2 x 1 mm
    assert m["empty"] is None


# --- hand-computed surfaces ------------------------------------------------------------------------------


def test_border_is_the_mask_minus_its_face_connected_erosion():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert border(cube).sum() == 26 and not border(cube)[2, 2, 2]
    edge = np.ones((3, 3), bool)  # touching the image edge: the outside counts as background
    assert border(edge).sum() == 8


def test_surface_distances_of_shifted_squares_with_anisotropic_spacing():
    pred, ref = _square_pair()
    d_pr, d_rp = surface_distances(pred, ref, (2.0, 1.0))
    # pred border: row 2 (the middle (2,2) is ref's centre: nearest ref border 1 mm sideways), row 3 sides,
    # row 4 (one 2-mm row below ref's bottom row)
    assert sorted(d_pr.tolist()) == [0, 0, 0, 0, 1, 2, 2, 2]
    # ref border: row 1 is 2 mm above pred's top row; (3,2) sits on pred's centre, 1 mm from pred's sides
    assert sorted(d_rp.tolist()) == [0, 0, 0, 0, 1, 2, 2, 2]
    m = compute_metrics(pred, ref, [1], (2.0, 1.0), nsd_tolerance={"1": 1.0})["1"]
    assert m["hd95_mm"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(10 / 16)  # the 8 zeros and 2 ones of 16 distances are within 1 mm
    assert m["nsd_tolerance_mm"] == 1.0
    assert compute_metrics(pred, ref, [1], (2.0, 1.0), nsd_tolerance=0.5)["1"]["nsd"] == pytest.approx(8 / 16)
    assert compute_metrics(pred, ref, [1], (2.0, 1.0))["1"]["nsd"] == 1.0  # default: 2 mm, the largest spacing


@pytest.mark.parametrize("offset, distance", [((1, 0, 0), 3.0), ((0, 0, 1), 1.0), ((1, 1, 0), math.sqrt(10))])
def test_hd95_is_in_mm_along_anisotropic_axes(offset, distance):
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1, 1, 1] = 1
    pred = np.zeros_like(ref)
    pred[1 + offset[0], 1 + offset[1], 1 + offset[2]] = 1
    m = compute_metrics(pred, ref, [1], spacing=(3.0, 1.0, 1.0), nsd_tolerance=2.0)["1"]
    assert m["hd95_mm"] == pytest.approx(distance)
    assert m["nsd"] == (1.0 if distance <= 2.0 else 0.0)
    assert m["dice"] == 0.0 and m["empty"] is None


def test_a_distance_equal_to_the_tolerance_counts_as_within():
    ref = np.zeros((8, 8), np.uint8)
    ref[2:5, 2:5] = 1
    pred = np.roll(ref, 3, axis=1)  # three 0.7-mm columns to the right: 2.1 mm, rounded to 2.0999999999999996
    spacing = (0.7, 0.7)
    assert compute_metrics(pred, ref, [1], spacing, nsd_tolerance=2.1)["1"]["nsd"] == 1.0
    assert compute_metrics(pred, ref, [1], spacing, nsd_tolerance=2.09)["1"]["nsd"] < 1.0
    one = np.roll(ref, 1, axis=0)  # the default tolerance is one voxel of the coarsest axis
    assert compute_metrics(one, ref, [1], (0.7, 0.3))["1"]["nsd"] == 1.0


def test_hd95_takes_the_percentile_of_the_union_of_both_directions():
    # one 10 mm outlier among 40 distances: the union's 95th percentile is 0; the larger of the two directed
    # 95th percentiles (MONAI's convention) would be 0.5
    d_pr = np.array([0.0] * 19 + [10.0])
    d_rp = np.zeros(20)
    assert hd95_from_distances(d_pr, d_rp) == 0.0
    assert np.percentile(d_pr, 95) == pytest.approx(0.5)


# --- empty masks -----------------------------------------------------------------------------------------


EMPTY_CASES = {  # name: (pred voxels, ref voxels, expected)
    "both": ([], [], dict(dice=nan, iou=nan, sensitivity=nan, precision=nan, specificity=1.0, hd95_mm=nan,
                          nsd=nan, volume_ref_mm3=0.0, volume_pred_mm3=0.0)),
    "ref": ([(1, 1)], [], dict(dice=0.0, iou=0.0, sensitivity=nan, precision=0.0, specificity=15 / 16,
                               hd95_mm=nan, nsd=0.0, volume_ref_mm3=0.0, volume_pred_mm3=2.0)),
    "pred": ([], [(1, 1), (1, 2)], dict(dice=0.0, iou=0.0, sensitivity=0.0, precision=nan, specificity=1.0,
                                        hd95_mm=nan, nsd=0.0, volume_ref_mm3=4.0, volume_pred_mm3=0.0)),
}


@pytest.mark.parametrize("kind", EMPTY_CASES)
def test_empty_mask_conventions(kind: str):
    pred_vox, ref_vox, expected = EMPTY_CASES[kind]
    pred, ref = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    for v in pred_vox:
        pred[v] = 1
    for v in ref_vox:
        ref[v] = 1
    for m in (compute_metrics(pred, ref, {"c": 1}, (2.0, 1.0))["c"], binary_metrics(pred, ref, (2.0, 1.0))):
        assert m["empty"] == kind
        for key, value in expected.items():
            assert _same(m[key], value), (key, m[key], value)


def test_specificity_is_nan_when_the_class_fills_the_image():
    full = np.ones((3, 3), np.uint8)
    m = compute_metrics(full, full, [1], (1.0, 1.0))["1"]
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["nsd"] == 1.0 and math.isnan(m["specificity"])


# --- label maps: classes, regions, the ignore label ------------------------------------------------------


def test_ignore_label_voxels_count_as_neither_class_nor_negative():
    ref = np.array([[1, 1, 0, 9, 9], [0, 0, 0, 9, 9]], np.uint8)
    pred = np.array([[1, 1, 0, 1, 1], [0, 0, 0, 1, 0]], np.uint8)
    m = compute_metrics(pred, ref, {"a": 1}, (1.0, 1.0), ignore=9)["a"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 0, 0, 4)  # 10 voxels, 4 ignored
    assert m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["volume_pred_mm3"] == 2.0


def test_region_labels_score_the_union_of_their_values():
    ref = np.array([[1, 2, 0, 0]], np.uint8)
    pred = np.array([[2, 2, 1, 0]], np.uint8)
    m = compute_metrics(pred, ref, {"whole": [1, 2], "core": 2}, (1.0, 1.0))
    assert m["whole"]["dice"] == pytest.approx(2 * 2 / 5)
    assert m["core"]["dice"] == pytest.approx(2 * 1 / 3)


def test_compute_metrics_refuses_mismatched_inputs():
    a = np.zeros((3, 3), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(a, np.zeros((3, 4), np.uint8), [1], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(a, a, [1], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="> 0"):
        compute_metrics(a, a, [0, 1], (1.0, 1.0))


def test_nsd_tolerance_default_override_and_errors():
    assert resolve_tolerances(None, ["a", "b"], (3.0, 0.8, 0.8)) == {"a": 3.0, "b": 3.0}
    assert resolve_tolerances(2, ["a", "b"], (3.0, 1.0)) == {"a": 2.0, "b": 2.0}
    assert resolve_tolerances({"b": 1.5}, ["a", "b"], (3.0, 1.0)) == {"a": 3.0, "b": 1.5}
    assert resolve_tolerances({"b": 1.5, "default": 2}, ["a", "b"], (3.0, 1.0)) == {"a": 2.0, "b": 1.5}
    with pytest.raises(ValueError, match="unknown class"):
        resolve_tolerances({"c": 1.0}, ["a", "b"], (1.0,))
    with pytest.raises(ValueError, match="positive"):
        resolve_tolerances(0.0, ["a"], (1.0,))


# --- cropping --------------------------------------------------------------------------------------------


def test_distance_transforms_run_on_the_structure_box_only(monkeypatch):
    shapes = []
    real = ndimage.distance_transform_edt

    def spy(x, *args, **kwargs):
        shapes.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(metrics.ndimage, "distance_transform_edt", spy)
    ref = np.zeros((60, 200, 200), np.uint8)
    ref[30:33, 50:55, 100:104] = 1
    pred = np.zeros_like(ref)
    pred[31:34, 50:55, 101:106] = 1
    compute_metrics(pred, ref, [1], (3.0, 1.0, 1.0))
    assert shapes == [(6, 7, 8)] * 2  # box of pred | ref (4 x 5 x 6) plus one voxel each side


def test_cropping_changes_nothing_also_at_the_image_edge():
    rng = np.random.default_rng(3)
    for _ in range(5):
        ref = ndimage.binary_dilation(rng.random((9, 14, 13)) > 0.97, iterations=2)
        pred = ref ^ (rng.random(ref.shape) > 0.9)
        ref[0, :4, :3] = True  # touches the image edge
        spacing = (2.5, 1.0, 0.6)
        cropped = compute_metrics(pred.astype(np.uint8), ref.astype(np.uint8), [1], spacing)["1"]
        d_pr, d_rp = surface_distances(pred, ref, spacing)  # whole image, no crop
        assert cropped["hd95_mm"] == pytest.approx(hd95_from_distances(d_pr, d_rp))
        assert cropped["nsd"] == pytest.approx(metrics.nsd_from_distances(d_pr, d_rp, 2.5))


# --- independent implementations -------------------------------------------------------------------------


def _random_pair(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Blobby reference and a prediction that overlaps it imperfectly, plus stray false positives."""
    ref = ndimage.binary_dilation(rng.random(shape) > 0.99, iterations=2)
    pred = ndimage.binary_dilation(ref, iterations=int(rng.integers(0, 2))) & (rng.random(shape) > 0.15)
    pred |= ndimage.binary_dilation(rng.random(shape) > 0.997)
    ref[tuple(s // 2 for s in shape)] = pred[tuple(s // 3 for s in shape)] = True  # never empty
    return pred, ref


def _brute_force_surface(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """HD95 and NSD from explicit neighbour tests and all pairwise distances (no erosion, no EDT)."""
    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    sp, sr = surface_points(pred), surface_points(ref)
    d = cdist(sp, sr)
    d_pr, d_rp = d.min(axis=1), d.min(axis=0)
    both = np.concatenate([d_pr, d_rp])
    # distances from coordinates in mm round differently from index steps x spacing: compare with slack
    return float(np.percentile(both, 95)), float(np.mean(both <= tolerance * (1 + 1e-9)))


@pytest.mark.parametrize("shape, spacing", [((10, 16, 14), (3.0, 1.0, 0.7)), ((30, 26), (0.5, 1.7))])
def test_surface_metrics_agree_with_brute_force_pairwise_distances(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    for _ in range(6):
        pred, ref = _random_pair(rng, shape)
        tol = float(rng.choice([0.7, 1.5, 3.0]))
        m = compute_metrics(pred.astype(np.uint8), ref.astype(np.uint8), [1], spacing, nsd_tolerance=tol)["1"]
        hd95, nsd = _brute_force_surface(pred, ref, spacing, tol)
        assert m["hd95_mm"] == pytest.approx(hd95, rel=1e-9)
        assert m["nsd"] == pytest.approx(nsd, rel=1e-9)


@pytest.mark.parametrize("shape, spacing", [((10, 16, 14), (3.0, 1.0, 0.7)), ((12, 12, 12), (1.0, 2.0, 0.5)),
                                            ((30, 26), (0.5, 1.7))])
def test_agrees_with_medpy_on_random_shapes_with_anisotropic_spacing(shape, spacing):
    mb = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for _ in range(8):
        pred, ref = _random_pair(rng, shape)
        m = binary_metrics(pred, ref, spacing)
        assert m["dice"] == pytest.approx(mb.dc(pred, ref), rel=1e-12)
        assert m["iou"] == pytest.approx(mb.jc(pred, ref), rel=1e-12)
        assert m["sensitivity"] == pytest.approx(mb.sensitivity(pred, ref), rel=1e-12)
        assert m["specificity"] == pytest.approx(mb.specificity(pred, ref), rel=1e-12)
        assert m["precision"] == pytest.approx(mb.precision(pred, ref), rel=1e-12)
        assert m["hd95_mm"] == pytest.approx(mb.hd95(pred, ref, voxelspacing=spacing), rel=1e-12)
