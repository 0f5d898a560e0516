"""Lesion-wise metrics: matching (IoU > 0.5 and BraTS 2023's dilated overlap), detection, lesion-wise Dice and
panoptic quality against hand-computed values and against MONAI's implementation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from autoseg.lesionwise import (
    LesionCounts,
    brats_reference,
    case_lesionwise,
    components,
    match_instances,
    summarize,
)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """Reference lesions A (16 px), B (4 px), C (9 px); predictions P1 on A (IoU 0.6), P2 half on B (IoU 0.25),
    P3 on nothing."""
    ref = np.zeros((40, 40), np.int32)
    pred = np.zeros_like(ref)
    ref[0:4, 0:4] = 5       # A
    ref[10:12, 10:12] = 9   # B
    ref[20:23, 20:23] = 2   # C
    pred[0:4, 1:5] = 1      # P1: 12 shared of 16 + 16
    pred[10:12, 11:14] = 2  # P2: 2 shared of 4 + 6
    pred[30:32, 30:32] = 3  # P3
    return ref, pred


def test_iou_matching_by_hand():
    ref, pred = _scene()
    m = match_instances(ref, pred, "iou")
    assert [(x.ref, x.preds) for x in m.matches] == [(2, ()), (5, (1,)), (9, ())]
    assert m.matches[1].iou == pytest.approx(0.6) and m.matches[1].dice == pytest.approx(0.75)
    assert m.missed == (2, 9) and m.false_positives == (2, 3)
    c = m.counts().as_dict()
    assert (c["n_ref"], c["n_pred"], c["tp"], c["fp"], c["fn"]) == (3, 3, 1, 2, 2)
    assert c["precision"] == pytest.approx(1 / 3) and c["recall"] == pytest.approx(1 / 3)
    assert c["f1"] == pytest.approx(1 / 3)
    assert c["lesion_dice"] == pytest.approx(0.75 / 5)  # the missed 2 and the false 2 count as zero
    assert c["sq"] == pytest.approx(0.6) and c["rq"] == pytest.approx(1 / 3) and c["pq"] == pytest.approx(0.2)


def test_brats_matching_by_hand():
    ref, pred = _scene()
    m = match_instances(ref, pred, "brats", dilation=1)
    assert [(x.ref, x.preds) for x in m.matches] == [(2, ()), (5, (1,)), (9, (2,))]
    assert m.matches[2].dice == pytest.approx(2 * 2 / 10) and m.false_positives == (3,)
    c = m.counts().as_dict()
    assert (c["tp"], c["tp_pred"], c["fp"], c["fn"]) == (2, 2, 1, 1)
    assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == pytest.approx(2 / 3)
    assert c["lesion_dice"] == pytest.approx((0.75 + 0.4) / 4)
    assert math.isnan(c["pq"])  # panoptic quality belongs to the one-to-one matching


def test_brats_dilation_reaches_a_prediction_beside_the_lesion_and_merges_close_reference_parts():
    ref = np.zeros((20, 20), bool)
    ref[5:7, 5:7] = True
    ref[5:7, 8:10] = True  # one empty column away: one lesion after BraTS's dilation, two components
    pred = np.zeros((20, 20), np.int32)
    pred[5:7, 10:12] = 1  # touches the second part's edge, no overlap
    merged = brats_reference(ref, dilation=1)
    assert len(np.unique(merged[merged > 0])) == 1 and len(np.unique(components(ref))) == 3
    m = match_instances(merged, pred, "brats", dilation=1)
    assert m.matches[0].preds == (1,) and m.matches[0].dice == 0.0 and m.false_positives == ()
    assert match_instances(merged, pred, "brats", dilation=0).false_positives == (1,)
    assert match_instances(components(ref), pred, "iou").counts().fp == 1


def test_touching_instances_merged_by_components_are_both_lost():
    """Two touching nuclei of one class: a semantic prediction's component covers both, IoU 0.5 each, no match."""
    label = np.zeros((10, 20), np.uint8)
    label[2:6, 2:10] = 1
    instances = np.zeros_like(label, dtype=np.int32)
    instances[2:6, 2:6], instances[2:6, 6:10] = 1, 2
    out = case_lesionwise(label, label, {"nucleus": 1}, ref_instances=instances)
    c = out["nucleus"]["iou"].counts()
    assert (c.n_ref, c.n_pred, c.tp, c.fp, c.fn) == (2, 1, 0, 1, 2)
    same = case_lesionwise(label, label, {"nucleus": 1}, ref_instances=instances, pred_instances=instances)
    assert same["nucleus"]["iou"].counts().scores()["pq"] == 1.0


def test_empty_conventions():
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:4, 2:4] = 1
    both = match_instances(empty, empty).counts().scores()
    assert all(math.isnan(v) for v in both.values())
    false = match_instances(empty, one).counts().scores()
    assert false["precision"] == 0 and math.isnan(false["recall"]) and false["f1"] == 0 and false["pq"] == 0
    missed = match_instances(one, empty).counts().scores()
    assert missed["recall"] == 0 and math.isnan(missed["precision"]) and missed["lesion_dice"] == 0


def test_pooling_weighs_every_lesion_the_same():
    a = match_instances(*_scene()).counts()
    b = LesionCounts(n_ref=1, n_pred=1, tp=1, tp_pred=1, sum_dice=1.0, sum_iou=1.0)
    s = summarize([a.as_dict(), b.as_dict()])
    assert s["pooled"]["tp"] == 2 and s["pooled"]["f1"] == pytest.approx(4 / 8)
    assert s["case_mean"]["f1"] == pytest.approx((1 / 3 + 1) / 2) and s["cases"] == 2


def _random_instances(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        lo = [int(rng.integers(0, s - 6)) for s in shape]
        out[tuple(slice(a, a + int(rng.integers(2, 7))) for a in lo)] = i
    return out


@pytest.mark.parametrize("shape", [(48, 48), (24, 32, 32)])
def test_panoptic_quality_agrees_with_monai(shape):
    monai_metrics = pytest.importorskip("monai.metrics")
    import torch
    rng = np.random.default_rng(0)
    for trial in range(6):
        ref = _random_instances(rng, shape, 12)
        pred = ref.copy() if trial % 2 else _random_instances(rng, shape, 10)
        if trial % 2:  # perturb: shift some, drop one, add one
            pred = np.roll(pred, 1, axis=0)
            pred[pred == 3] = 0
            pred[tuple(slice(0, 3) for _ in shape)] = 40
        ours = match_instances(ref, pred, "iou").counts()
        tp, fp, fn, iou_sum = monai_metrics.compute_panoptic_quality(
            torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(ref.astype(np.int64)),
            output_confusion_matrix=True).tolist()
        assert (ours.tp, ours.fp, ours.fn) == (int(tp), int(fp), int(fn)), trial
        assert ours.sum_iou == pytest.approx(iou_sum, abs=1e-4)
        theirs = monai_metrics.compute_panoptic_quality(torch.from_numpy(pred.astype(np.int64)),
                                                        torch.from_numpy(ref.astype(np.int64)), metric_name="pq")
        assert ours.scores()["pq"] == pytest.approx(float(theirs), abs=1e-4)


def test_fast_on_a_3d_volume_with_many_lesions():
    rng = np.random.default_rng(1)
    ref = _random_instances(rng, (96, 128, 128), 300)
    pred = np.roll(ref, 1, axis=1)
    label = (ref > 0).astype(np.uint8)
    start = time.perf_counter()
    out = case_lesionwise(label, (pred > 0).astype(np.uint8), {"lesion": 1}, ref_instances=ref, pred_instances=pred)
    elapsed = time.perf_counter() - start
    assert out["lesion"]["iou"].counts().n_ref == len(np.unique(ref)) - 1
    assert elapsed < 10, elapsed  # ~1 s unloaded; the bound leaves room for a loaded machine
