"""Regions as arrays: label maps to region masks and back, nnU-Net's painting order, the threshold on summed
probabilities that the ensemble and the selection share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.regions import labels_to_regions, present, region_masks, regions_to_labels
from autoseg.schema.labels import painted_values, region_problems, regions_of, scored_classes

BRATS = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
REGIONS = list(regions_of(BRATS).values())


def test_regions_of_a_dataset_json_and_what_is_scored():
    assert REGIONS == [(1, 2, 3), (2, 3), (3,)]
    assert scored_classes(BRATS) == {(1, 2, 3): "whole tumour", (2, 3): "tumour core", (3,): "enhancing tumour"}
    assert regions_of({"background": 0, "whole": [1, 2], "core": 2}) == {"whole": (1, 2), "core": (2,)}
    assert regions_of({"background": 0, "a": 1, "b": 2}) == {} and scored_classes({"background": 0, "a": 1}) == {1: "a"}


def test_a_label_map_survives_regions_and_back_in_class_order():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (5, 6, 7)).astype(np.uint8)
    masks = labels_to_regions(seg, REGIONS)
    assert masks.shape == (3, 5, 6, 7) and np.array_equal(masks[0], seg > 0) and np.array_equal(masks[2], seg == 3)
    assert np.array_equal(regions_to_labels(masks.astype(np.float32), [1, 2, 3]), seg)
    torch_masks = region_masks(torch.from_numpy(seg.astype(np.int64))[None], REGIONS)[0].numpy()
    assert np.array_equal(torch_masks, masks)


def test_later_regions_paint_over_earlier_and_a_wrong_order_does_not_map_back():
    seg = np.array([0, 1, 2, 3])
    masks = labels_to_regions(seg, REGIONS).astype(np.float32)
    assert regions_to_labels(masks, [3, 2, 1]).tolist() == [0, 3, 2, 1]  # region i paints order[i], last wins
    assert painted_values(REGIONS, [3, 2, 1], [1, 2, 3]) == {1: 3, 2: 2, 3: 1}
    assert region_problems(BRATS, [1, 2, 3]) == []
    [problem] = region_problems(BRATS, [3, 2, 1])
    assert "does not map regions back to labels" in problem and "turns label 1 into 3" in problem


def test_a_region_is_present_above_half_of_the_members_summed_probability():
    summed = np.array([0.5, 0.5001, 1.0, 1.0001])  # two members
    assert present(summed, 2).tolist() == [False, False, False, True]
    assert present(summed[:2], 1).tolist() == [False, True]


@pytest.mark.parametrize("labels, order, expected", [
    ({"background": 0, "a": [1, 1, 2], "b": 2}, [1, 2], "region 'a' lists a value twice"),
    ({"background": 0, "a": [1, 2], "b": [2, 1]}, [1, 2], "regions 'a' and 'b' are the same values [1, 2]"),
    ({"background": 0, "a": [0, 1]}, [1], "region 'a' holds 0, which is background or ignore"),
    (BRATS, [1, 2, 4], "'regions_class_order' [1, 2, 4] holds 4, not a value of any region"),
])
def test_region_definitions_that_make_no_sense_are_named(labels, order, expected):
    assert any(p.startswith(expected) for p in region_problems(labels, order)), region_problems(labels, order)


# --- end to end: plan -> train -> predict -> evaluate of a region dataset from the command line ------------


@pytest.mark.usefixtures("one_torch_thread")
def test_a_region_dataset_trains_predicts_and_is_scored_per_region_from_the_cli(tmp_path, capsys):
    """brats-like, tiny: dataset.json's regions are trained as regions with no flag, predicted as a label map
    painted in regions_class_order (probabilities: one map per region), scored and reported per region; a short
    training must find the whole tumour (a random network scores ~0.1 there)."""
    import json
    import zipfile

    from autoseg.cli import run
    from autoseg.io import read_label
    from autoseg.synth import generate

    ds = generate("brats-like", tmp_path / "ds", size="tiny", cases=4, seed=3)
    work, pred = tmp_path / "work", tmp_path / "pred"
    assert run(["-q", "plan", str(ds), "-w", str(work), "--budget", "1m", "--device", "cpu", "--folds", "2",
                "-j", "1"]) == 0
    assert run(["-q", "train", str(ds), "-w", str(work), "--steps", "60", "--device", "cpu", "--workers", "0"]) == 0
    selection = json.loads((work / "selection.json").read_text())
    assert list(selection["classes"].values()) == ["whole tumour", "tumour core", "enhancing tumour"]
    with zipfile.ZipFile(work / "model.autoseg") as z:
        manifest = json.loads(z.read("manifest.json"))
        card = z.read("README.md").decode()
    assert manifest["input"]["regions_class_order"] == [1, 2, 3] and "Regions: one sigmoid output" in card
    capsys.readouterr()
    assert run(["-q", "predict", str(work / "model.autoseg"), str(ds / "imagesTs"), str(pred),
                "--save-probabilities", "--mirror", "off"]) == 0
    for label in sorted((ds / "labelsTs").iterdir()):
        seg, _ = read_label(pred / label.name)
        case = label.name.replace(".nii.gz", "")
        with np.load(pred / f"{case}.npz") as f:
            maps = f["probabilities"]
        assert maps.shape == (3, *seg.shape) and set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        # the whole tumour region is where a label was painted (up to what the post-processing rules changed)
        assert np.mean((seg > 0) == (maps[0] > 0.5)) > 0.95
    assert run(["-q", "evaluate", str(pred), str(ds / "labelsTs"), "--dataset-json", str(ds / "dataset.json"),
                "--report"]) == 0
    metrics = json.loads((pred / "metrics.json").read_text())["summary"]["per_class"]
    assert list(metrics) == ["whole tumour", "tumour core", "enhancing tumour"]
    assert metrics["whole tumour"]["dice"]["mean"] > 0.3, metrics["whole tumour"]["dice"]
    assert "tumour core" in (pred / "report.html").read_text()
