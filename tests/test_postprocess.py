"""Post-processing: each rule on constructed label maps, and the CV tuner's criterion (the mean Dice rises and
no class falls), including a property test on random cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from autoseg.errors import UserError
from autoseg.postprocess import (
    CaseLabels,
    apply_postprocessing,
    candidate_groups,
    case_counts,
    mean_dice,
    parse_rules,
    size_bases,
    split_weights,
    tune_class_weights,
    tune_postprocessing,
    weighted_argmax,
)
from autoseg.schema.fingerprint import ClassStats

SPACING = (1.0, 1.0, 1.0)


def test_largest_component_keeps_the_big_blob_and_clears_the_rest():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:5, 1:5, 1:5] = 1
    seg[8, 8, 8] = 1
    seg[7:9, 1:3, 7:9] = 2  # another class: left alone by a class-1 rule
    out = apply_postprocessing(seg, [{"rule": "largest_component", "classes": [1]}], SPACING)
    assert out[8, 8, 8] == 0 and (out[1:5, 1:5, 1:5] == 1).all() and (out == 2).sum() == 8
    assert seg[8, 8, 8] == 1  # the input is not modified


def test_largest_component_of_the_foreground_keeps_the_classes_inside_it():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:6, 1:6, 1:6] = 1
    seg[3, 3, 3] = 2  # inner class, part of the big foreground object
    seg[8:10, 8:10, 8:10] = 2  # separate speck of class 2
    out = apply_postprocessing(seg, [{"rule": "largest_component", "classes": [1, 2]}], SPACING)
    assert out[3, 3, 3] == 2 and (out[8:10, 8:10, 8:10] == 0).all() and (out == 1).sum() == 124


def test_components_touching_at_a_corner_are_one_component():
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    seg[3, 3, 3] = 1  # diagonal neighbour: full (26) connectivity, as the fingerprint counts
    out = apply_postprocessing(seg, [{"rule": "largest_component", "classes": [1]}], SPACING)
    assert out[3, 3, 3] == 1


def test_remove_small_drops_specks_below_the_threshold_in_voxels_and_mm3():
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[0, 0, 0] = 1  # 1 voxel
    seg[5, 0:5, 0] = 1  # 5 voxels
    seg[8:11, 8:11, 8:11] = 1  # 27 voxels
    out = apply_postprocessing(seg, [{"rule": "remove_small", "classes": [1], "min_voxels": 5}], SPACING)
    assert out[0, 0, 0] == 0 and (out == 1).sum() == 32
    # 2 mm3 voxels: 5 voxels = 10 mm3 is not below 10 mm3; 27 voxels = 54 mm3 is below 60 mm3
    out = apply_postprocessing(seg, [{"rule": "remove_small", "class": 1, "min_mm3": 10.0}], (2.0, 1.0, 1.0))
    assert (out == 1).sum() == 32
    out = apply_postprocessing(seg, [{"rule": "remove_small", "classes": [1], "min_mm3": 60.0}], (2.0, 1.0, 1.0))
    assert not out.any()


def test_remove_small_works_in_2d():
    seg = np.zeros((8, 8), np.uint8)
    seg[0, 0] = 2
    seg[3:7, 3:7] = 2
    out = apply_postprocessing(seg, [{"rule": "remove_small", "classes": [2], "min_voxels": 2}], (1.0, 1.0))
    assert out[0, 0] == 0 and (out == 2).sum() == 16


def test_fill_holes_fills_enclosed_background_but_not_other_classes_or_open_cavities():
    seg = np.zeros((9, 9, 18), np.uint8)
    seg[1:8, 1:8, 1:8] = 1
    seg[3:6, 3:6, 3:6] = 0  # enclosed hole
    seg[4, 4, 4] = 2  # an inner class inside the hole
    seg[1:8, 1:8, 10:17] = 1
    seg[3:6, 3:6, 12:15] = 0  # a cavity ...
    seg[1:3, 4, 13] = 0  # ... with a channel to the outside: not a hole
    out = apply_postprocessing(seg, [{"rule": "fill_holes", "classes": [1]}], SPACING)
    assert out[4, 4, 4] == 2 and (out[3:6, 3:6, 3:6] == 1).sum() == 26
    assert (out[:, :, 9:] == seg[:, :, 9:]).all()


def test_rules_from_json_are_checked_and_name_the_file():
    assert parse_rules([{"rule": "fill_holes", "class": 2}]) == [{"rule": "fill_holes", "classes": [2]}]
    for bad in ([{"rule": "dilate", "classes": [1]}], [{"rule": "remove_small", "classes": [1]}],
                [{"rule": "fill_holes", "classes": [1, 2]}], [{"rule": "largest_component", "classes": []}], {}):
        with pytest.raises(UserError, match="selection.json"):
            parse_rules(bad, "selection.json")


def test_size_candidates_are_fractions_of_the_typical_smallest_component():
    stats = ClassStats(value=2, name="b", cases_present=4, volume_voxels={}, volume_mm3={"p5": 200.0},
                       components_per_case={"median": 2.0, "max": 3.0}, extent_mm={})
    bases = size_bases(SimpleNamespace(classes=[stats]), [1, 2])
    assert bases == {2: 100.0}
    groups = candidate_groups([1, 2], bases)
    sizes = [r["min_mm3"] for g in groups for r in g if r["rule"] == "remove_small" and r["classes"] == [2]]
    assert sizes == [2.0, 5.0, 10.0, 25.0, 50.0]
    assert [{"rule": "largest_component", "classes": [1, 2]}] in groups  # the foreground union comes first


# --- tuning ------------------------------------------------------------------------------------------------


def _case(i: int, pred: np.ndarray, ref: np.ndarray) -> CaseLabels:
    return CaseLabels.cropped(f"c{i}", pred, ref, SPACING)


def test_tuner_keeps_a_rule_that_removes_false_positive_specks():
    cases = []
    for i in range(3):
        ref = np.zeros((10, 12, 12), np.uint8)
        ref[2:7, 2:7, 2:7] = 1
        pred = ref.copy()
        pred[9, 11 - i, 11] = 1  # a false-positive speck
        cases.append(_case(i, pred, ref))
    rules, log = tune_postprocessing(cases, [1])
    assert rules and rules[0]["rule"] == "largest_component"
    assert log[0]["after"] == 1.0 > log[0]["before"]


def _trade_off_cases() -> list[CaseLabels]:
    """Three cases where the foreground's largest component fixes class 1 (two false-positive blobs) but, in
    the first case, deletes a correct class-2 object lying apart from the rest: mean up, class 2 down."""
    cases = []
    for i in range(3):
        ref = np.zeros((12, 22, 22), np.uint8)
        ref[1:6, 1:6, 1:6] = 1
        if i == 0:
            ref[8:10, 1:3, 16:18] = 2  # apart
        else:
            ref[6:8, 2:4, 2:4] = 2  # touching class 1
        pred = ref.copy()
        pred[1:5, 10:14, 10:14] = 1
        pred[7:11, 16:20, 1:5] = 1
        cases.append(_case(i, pred, ref))
    return cases


def test_tuner_rejects_a_rule_that_hurts_one_class_even_if_the_mean_improves():
    cases = _trade_off_cases()
    foreground = {"rule": "largest_component", "classes": [1, 2]}
    rules, log = tune_postprocessing(cases, [1, 2], groups=[[foreground]])
    assert rules == []
    assert log[0]["after"] > log[0]["before"] and not log[0]["acceptable"]
    assert log[0]["class_after"][2] < 1.0
    # with every candidate, the class-1 rule does the good part of it without the harm
    rules, _ = tune_postprocessing(cases, [1, 2])
    assert foreground not in rules and {"rule": "largest_component", "classes": [1]} in rules


def _scores(preds, cases, classes):
    return mean_dice([case_counts(p, c.ref, classes) for p, c in zip(preds, cases)], classes)


@pytest.mark.parametrize("seed", range(20))
def test_tuned_rules_never_lower_any_class_dice_on_random_cases(seed):
    """Property: on the full arrays (not the crops the tuner works on), the kept rules raise the mean and
    lower no class; the tuner's own score agrees with that recomputation."""
    rng = np.random.default_rng(seed)
    classes = [1, 2, 3]
    full = []
    for _ in range(5):
        ref = np.zeros((10, 14, 14), np.uint8)
        for c in classes:
            if rng.random() < 0.85:
                lo = rng.integers(0, [6, 9, 9])
                size = rng.integers(2, 6, 3)
                ref[tuple(slice(a, a + s) for a, s in zip(lo, size))] = c
        pred = ref.copy()
        noise = rng.random(ref.shape)
        pred[noise < 0.03] = rng.integers(0, 4, int((noise < 0.03).sum()))  # scattered flips
        pred[(noise > 0.5) & (noise < 0.52)] = 0  # holes
        full.append((pred, ref))
    cases = [_case(i, p, r) for i, (p, r) in enumerate(full)]
    bases = {c: float(rng.uniform(5, 40)) for c in classes}
    rules, log = tune_postprocessing(cases, classes, bases=bases)
    before = _scores([p for p, _ in full], cases=[SimpleNamespace(ref=r) for _, r in full], classes=classes)
    after = _scores([apply_postprocessing(p, rules, SPACING) for p, _ in full],
                    cases=[SimpleNamespace(ref=r) for _, r in full], classes=classes)
    for c in classes:
        assert after[0][c] is None or (before[0][c] is not None and after[0][c] >= before[0][c])
    assert after[1] >= before[1]
    if rules:
        assert after[1] > before[1]
        assert after[1] == pytest.approx([e for e in log if e["kept"]][-1]["after"], abs=1e-12)
    assert len(log) > 0


def test_crops_give_the_same_dice_as_the_full_arrays():
    rng = np.random.default_rng(3)
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[4:9, 5:10, 6:12] = 1
    pred = ref.copy()
    pred[2:12, 2:12, 2:12][rng.random((10, 10, 10)) < 0.05] = 2
    case = _case(0, pred, ref)
    assert case.pred.size < pred.size
    assert case_counts(case.pred, case.ref, [1, 2]) == case_counts(pred, ref, [1, 2])


# --- regions: rules and the guard per region --------------------------------------------------------------

REGIONS = [(1, 2, 3), (2, 3), (3,)]


def test_region_counts_are_those_of_the_union_of_their_values():
    rng = np.random.default_rng(4)
    pred, ref = rng.integers(0, 4, (6, 7, 8)), rng.integers(0, 5, (6, 7, 8))  # 4: ignored
    counts = case_counts(pred, ref, REGIONS, ignore=4)
    keep = ref != 4
    for r in REGIONS:
        p, t = np.isin(pred, r)[keep], np.isin(ref, r)[keep]
        assert counts[r] == (int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()))


def test_region_candidates_are_each_regions_own_and_fill_holes_only_one_value_regions():
    groups = candidate_groups(REGIONS, {(1, 2, 3): 100.0})
    rules = [g[0]["rule"] + str(g[0]["classes"]) for g in groups]
    assert rules == ["largest_component[1, 2, 3]", "remove_small[1, 2, 3]", "largest_component[2, 3]",
                     "largest_component[3]", "fill_holes[3]"]


def test_a_region_rule_that_would_lower_another_region_is_refused():
    """A speck of enhancing tumour outside the tumour: largest_component of the core region removes it (the
    core gains) but a second true whole-tumour component nearby is enhancing too: removing it costs the whole
    tumour region, so the rule is refused."""
    ref = np.zeros((1, 12, 12), np.uint8)
    ref[0, 1:5, 1:5], ref[0, 2:4, 2:4] = 1, 3  # the tumour: oedema around an enhancing core
    ref[0, 8:11, 8:11] = 1  # a second oedema component, no core
    pred = ref.copy()
    pred[0, 9, 9] = 3  # the network calls its centre enhancing: a false positive for core and enhancing
    case = CaseLabels.cropped("c", pred, ref, (1.0, 1.0, 1.0))
    rules, log = tune_postprocessing([case], REGIONS, groups=[[{"rule": "largest_component", "classes": [2, 3]}]])
    assert rules == [] and log[0]["after"] > log[0]["before"] and not log[0]["acceptable"]


# --- class weights: a factor on a class's probabilities before the argmax ---------------------------------


def test_class_weights_rules_are_checked_and_come_first():
    rule = {"rule": "class_weights", "classes": [2], "factors": [4.0]}
    assert parse_rules([rule, {"rule": "fill_holes", "classes": [1]}])[0] == rule
    for bad in ([{**rule, "factors": [0.0]}], [{**rule, "factors": [2.0, 3.0]}], [{**rule, "factors": "x4"}],
                [{"rule": "fill_holes", "classes": [1]}, rule]):
        with pytest.raises(UserError, match="selection.json"):
            parse_rules(bad, "selection.json")
    seg = np.zeros((4, 4), np.uint8)
    assert (apply_postprocessing(seg, [rule], (1.0, 1.0)) == seg).all()  # label maps: nothing to weigh


def test_weighted_argmax_multiplies_the_class_and_ties_go_to_the_lower_class():
    p = np.array([[0.7, 0.5, 0.2], [0.1, 0.25, 0.1], [0.2, 0.25, 0.7]], np.float32)[:, None, :]  # (K=3, 1, 3)
    assert weighted_argmax(p, {}).ravel().tolist() == [0, 0, 2]
    assert weighted_argmax(p, {1: 2.0}).ravel().tolist() == [0, 0, 2]  # 0.5 ties 0.5: the lower class
    assert weighted_argmax(p, {1: 4.0}).ravel().tolist() == [0, 1, 2]


def _unsure_case(present: bool, rng: np.random.Generator, noise_p: float = 0.0,
                 small_p: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class case: a large class 1 the network is sure of and, when ``present``, a small class 2 it finds at
    ``small_p`` (the background keeps the rest); elsewhere class 2 at up to ``noise_p``."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:7, 1:11, 1:11] = 1
    p = np.zeros((3, *ref.shape), np.float32)
    p[2] = noise_p * rng.uniform(0, 1, ref.shape)
    p[1] = np.where(ref == 1, 0.9, 0.05)
    if present:
        ref[8:11, 4:7, 4:7] = 2
        p[2][ref == 2] = small_p
        p[1][ref == 2] = 0.0
    p[0] = 1 - p[1] - p[2]
    return p, ref


def test_tuned_class_weights_give_back_an_unsure_small_class():
    rng = np.random.default_rng(0)
    cases = [_unsure_case(i % 2 == 0, rng) for i in range(4)]
    rules, log = tune_class_weights(lambda: iter(cases), [1, 2])
    assert len(rules) == 1 and rules[0]["classes"] == [2] and rules[0]["factors"][0] >= 3.0  # 0.3 x 3 > 0.7
    assert any(e["kept"] for e in log) and not any(e["kept"] for e in log if e["rule"]["classes"] == [1])
    before = mean_dice([case_counts(weighted_argmax(p, {}), r, [1, 2]) for p, r in cases], [1, 2])[0]
    after = mean_dice([case_counts(weighted_argmax(p, split_weights(rules)[0]), r, [1, 2]) for p, r in cases], [1, 2])[0]
    assert before[2] == 0.0 and after[2] == 1.0 and after[1] == before[1]


def test_class_weights_that_would_take_another_class_are_refused_and_learned_classes_are_not_tried():
    """Class 2 at p 0.3 inside (lost by the argmax); inside class 1, p 0.5 for it and 0.1-0.25 for class 2. Factors
    up to 2 do not find class 2 (0.6 < 0.7) and gain nothing; 3 and more find it but paint some of class 1's voxels
    (0.75 > 0.5): class 2 rises, class 1 falls, refused. Class 1 (Dice 1.0, learned) is not tried at all."""
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(3):
        p, ref = _unsure_case(True, rng)
        inside = ref == 1
        p[1][inside], p[2][inside] = 0.5, rng.uniform(0.1, 0.25, int(inside.sum()))
        p[0][inside] = 0.5 - p[2][inside]
        cases.append((p, ref))
    rules, log = tune_class_weights(lambda: iter(cases), [1, 2])
    assert rules == [] and log and not any(e["kept"] for e in log)
    assert all(e["rule"]["classes"] == [2] for e in log)  # class 1 was not tried
    assert any(e["class_after"][2] > 0 and not e["acceptable"] for e in log)  # class 2 found, class 1 paid: refused
