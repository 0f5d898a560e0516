"""dataset.json is read as nnU-Net v2 writes it; every problem in it is named; cases are found on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from autoseg.dataset import Dataset, load_dataset, parse_dataset_json
from autoseg.errors import DatasetError

GOOD = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 0, "file_ending": ".nii.gz"}
BRATS_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}


def _write_json(root: Path, meta: dict | str, **changes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(meta, dict):
        meta = json.dumps({**meta, **changes})
    (root / "dataset.json").write_text(meta)
    return root


def _problems(root: Path) -> list[str]:
    ds, problems = parse_dataset_json(root)
    assert (ds is None) == bool(problems)
    return [p.message for p in problems]


# --- good dataset.json -----------------------------------------------------------------------------------


def test_tiny_dataset_loads_with_its_fields(tiny_dataset: Path):
    ds = load_dataset(tiny_dataset)
    assert isinstance(ds, Dataset) and ds.root == tiny_dataset
    assert ds.name == "Dataset001_Tiny" and ds.channel_names == ["MRI"] and ds.num_channels == 1
    assert ds.labels == {"background": 0, "outer": 1, "inner": 2} and ds.num_training == 3
    assert ds.file_ending == ".nii.gz" and ds.regions_class_order is None
    assert ds.classes == {1: "outer", 2: "inner"} and ds.label_values == [0, 1, 2]
    assert ds.ignore_label is None and not ds.has_regions


def test_cases_are_sorted_with_channel_files_in_order_and_their_label(tmp_path: Path):
    root = write_tiny_dataset(tmp_path / "D", cases=3, channels=("T1", "T2"), shape=(8, 9))
    cases = load_dataset(root).cases()
    assert [c.id for c in cases] == ["case000", "case001", "case002"]
    assert cases[1].images == (root / "imagesTr" / "case001_0000.nii.gz", root / "imagesTr" / "case001_0001.nii.gz")
    assert cases[1].label == root / "labelsTr" / "case001.nii.gz"
    assert all(p.is_file() for c in cases for p in (*c.images, c.label))


def test_cases_skip_hidden_foreign_and_unpatterned_files(tiny_dataset: Path):
    images = tiny_dataset / "imagesTr"
    (images / "._case000_0000.nii.gz").write_bytes(b"macOS resource fork")
    (images / ".tmp-abc.nii.gz").write_bytes(b"someone's unfinished write")
    (images / "notes.txt").write_text("x")
    (images / "case009_0000.nrrd").write_text("other ending")
    (images / "case010.nii.gz").write_text("no channel suffix")
    assert [c.id for c in load_dataset(tiny_dataset).cases()] == ["case000", "case001", "case002"]


def test_case_with_a_missing_channel_is_listed_for_validate_to_name(tmp_path: Path):
    root = write_tiny_dataset(tmp_path / "D", cases=2, channels=("T1", "T2"))
    (root / "imagesTr" / "case001_0001.nii.gz").unlink()
    case = load_dataset(root).cases()[1]
    assert case.id == "case001" and not case.images[1].is_file()


def test_test_cases_have_no_label_and_absent_folders_give_no_cases(tiny_dataset: Path):
    ds = load_dataset(tiny_dataset)
    assert ds.cases("Ts") == []
    (tiny_dataset / "imagesTs").mkdir()
    (tiny_dataset / "imagesTr" / "case001_0000.nii.gz").rename(tiny_dataset / "imagesTs" / "new_0000.nii.gz")
    assert [(c.id, c.label) for c in ds.cases("Ts")] == [("new", None)]


def test_name_falls_back_to_the_folder(tmp_path: Path):
    assert load_dataset(_write_json(tmp_path / "Dataset007_X", GOOD)).name == "Dataset007_X"
    assert load_dataset(_write_json(tmp_path / "Y", GOOD, name="Liver")).name == "Liver"


@pytest.mark.parametrize("ending", [".nii", ".nrrd", ".mha", ".png", ".tif"])
def test_every_supported_ending_is_accepted(tmp_path: Path, ending: str):
    assert load_dataset(_write_json(tmp_path / "D", GOOD, file_ending=ending)).file_ending == ending


def test_regions_with_a_class_order_are_accepted(tmp_path: Path):
    ds = load_dataset(_write_json(tmp_path / "D", GOOD, labels=BRATS_REGIONS, regions_class_order=[1, 2, 3]))
    assert ds.has_regions and ds.regions_class_order == [1, 2, 3]
    assert ds.label_values == [0, 1, 2, 3]


def test_ignore_label_above_the_rest_is_accepted_and_not_a_class(tmp_path: Path):
    ds = load_dataset(_write_json(tmp_path / "D", GOOD, labels={"background": 0, "organ": 1, "ignore": 2}))
    assert ds.ignore_label == 2 and ds.classes == {1: "organ"} and ds.label_values == [0, 1, 2]


def test_background_may_have_another_name(tmp_path: Path):
    assert load_dataset(_write_json(tmp_path / "D", GOOD, labels={"bg": 0, "organ": 1})).classes == {1: "organ"}


# --- bad dataset.json ------------------------------------------------------------------------------------


def test_missing_folder_and_missing_file_are_named(tmp_path: Path):
    ds, problems = parse_dataset_json(tmp_path / "nowhere")
    assert ds is None and [str(p) for p in problems] == [f"{tmp_path / 'nowhere'}: dataset folder not found"]
    (tmp_path / "empty").mkdir()
    _, problems = parse_dataset_json(tmp_path / "empty")
    assert problems[0].where == str(tmp_path / "empty" / "dataset.json")
    assert problems[0].message.startswith("missing")


@pytest.mark.parametrize("text, expected", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_unparsable_dataset_json_is_one_problem(tmp_path: Path, text: str | bytes, expected: str):
    root = _write_json(tmp_path / "D", "")
    (root / "dataset.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    [message] = _problems(root)
    assert message.startswith(expected)


def test_every_missing_required_key_is_listed(tmp_path: Path):
    root = _write_json(tmp_path / "D", {"labels": {"background": 0}})
    assert _problems(root) == [f"lacks the required key '{k}'" for k in ("channel_names", "numTraining", "file_ending")]


@pytest.mark.parametrize("changes, expected", [
    ({"channel_names": {}}, "'channel_names' must be a non-empty object"),
    ({"channel_names": ["CT"]}, "'channel_names' must be a non-empty object"),
    ({"channel_names": {"a": "CT"}}, "'channel_names' keys must be channel indices"),
    ({"channel_names": {"0": "T1", "2": "T2"}}, "'channel_names' indices must be 0..1"),
    ({"labels": {}}, "'labels' must be a non-empty object"),
    ({"labels": {"organ": 1}}, "labels must start with background = 0"),
    ({"labels": {"background": 1, "organ": 0}}, "'background' must be 0, got 1"),
    ({"labels": {"background": 0, "organ": 2}}, "label values must be consecutive integers from 0, got [0, 2]"),
    ({"labels": {"background": 0, "a": 1, "b": 1}}, "two labels share a value"),
    ({"labels": {"background": 0, "organ": "1"}}, "label 'organ' must map to an integer"),
    ({"labels": {"background": 0, "organ": True}}, "label 'organ' must map to an integer"),
    ({"labels": {"background": 0, "organ": []}}, "label 'organ' is an empty region ([])"),
    ({"labels": {"background": 0, "organ": 1, "ignore": 1}}, "the 'ignore' label must be the highest value"),
    ({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 1}}, "the 'ignore' label must be the highest value, got 1"),
    ({"labels": {"background": 0, "organ": 1, "ignore": [2]}}, "the 'ignore' label must be one integer"),
    ({"numTraining": -1}, "'numTraining' must be a non-negative integer, got -1"),
    ({"numTraining": "3"}, "'numTraining' must be a non-negative integer, got '3'"),
    ({"numTraining": True}, "'numTraining' must be a non-negative integer, got True"),
    ({"file_ending": ".jpg"}, "'file_ending' '.jpg' is not supported"),
    ({"file_ending": 3}, "'file_ending' 3 is not supported"),
    ({"regions_class_order": "1,2"}, "'regions_class_order' must be a list of integers"),
])
def test_bad_field_is_named(tmp_path: Path, changes: dict, expected: str):
    problems = _problems(_write_json(tmp_path / "D", GOOD, **changes))
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("changes, expected", [
    ({}, "labels define regions (lists of values) but 'regions_class_order' is missing"),
    ({"regions_class_order": [1, 3]}, "'regions_class_order' has 2 entries but labels define 3 regions"),
    ({"labels": {**BRATS_REGIONS, "enhancing tumor": 5}, "regions_class_order": [1, 2, 5]},
     "label values must be consecutive integers from 0, got [0, 1, 2, 3, 5]"),
    ({"labels": {"background": 0, "core": [1, 3]}, "regions_class_order": [1]},
     "label values must be consecutive integers from 0, got [0, 1, 3]"),
    ({"labels": {**BRATS_REGIONS, "ignore": 3}, "regions_class_order": [1, 2, 3]},
     "the 'ignore' label must be the highest value, got 3"),
])
def test_bad_regions_are_named(tmp_path: Path, changes: dict, expected: str):
    problems = _problems(_write_json(tmp_path / "D", GOOD, **{"labels": BRATS_REGIONS, **changes}))
    assert any(p.startswith(expected) for p in problems), problems


def test_regions_may_mention_values_only_inside_lists(tmp_path: Path):
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    assert load_dataset(_write_json(tmp_path / "D", GOOD, labels=labels, regions_class_order=[1, 2])).has_regions


def test_load_dataset_raises_one_line_per_problem(tmp_path: Path):
    root = _write_json(tmp_path / "D", GOOD, numTraining=-1, file_ending=".jpg")
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    lines = str(e.value).splitlines()
    assert len(lines) == len(e.value.problems) == 2
    assert all(line.startswith(f"{root / 'dataset.json'}: ") for line in lines)
