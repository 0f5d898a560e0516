"""``autoseg validate``: each entry of the catalogue on a tiny dataset broken in exactly one way."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_tiny_dataset

from autoseg import parallel
from autoseg.errors import Problem
from autoseg.io import Geometry, read_image, read_label, write_image, write_label
from autoseg.validate import validate_dataset

# --- helpers -------------------------------------------------------------------------------------------


def _check(root: Path, **kw) -> list[Problem]:
    return validate_dataset(root, jobs=1, **kw)


def _only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def _edit_json(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (root / "dataset.json").write_text(json.dumps(meta))


def _image(root: Path, case: int = 1, channel: int = 0, ending: str = ".nii.gz") -> Path:
    return root / "imagesTr" / f"case{case:03d}_{channel:04d}{ending}"


def _label(root: Path, case: int = 1, ending: str = ".nii.gz") -> Path:
    return root / "labelsTr" / f"case{case:03d}{ending}"


def _rewrite_label(path: Path, transform) -> None:
    """Read a label, change its array and/or geometry with ``transform``, write it back."""
    seg, geometry = read_label(path)
    seg, geometry = transform(seg, geometry)
    write_label(seg, geometry, path)


def _rewrite_image(path: Path, transform) -> None:
    arr, geometry = read_image(path)
    arr, geometry = transform(arr[0], geometry)
    write_image(arr, geometry, path)


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "Dataset001_Tiny")


# --- valid datasets ------------------------------------------------------------------------------------


def test_generated_multichannel_dataset_with_test_images_has_no_problem(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", channels=("T1", "T2"))
    shutil.copytree(root / "imagesTr", root / "imagesTs")
    assert _check(root) == []


@pytest.mark.parametrize("shape, ending", [((16, 16), ".nii.gz"), ((16, 16), ".png"), ((6, 8, 8), ".nii"),
                                           ((6, 8, 8), ".nrrd"), ((6, 8, 8), ".mha"), ((6, 8, 8), ".mhd")])
def test_2d_and_other_formats_have_no_problem(tmp_path, shape, ending):
    assert _check(write_tiny_dataset(tmp_path / "D", shape=shape, ending=ending)) == []


def test_every_synthetic_task_is_valid(tmp_path):
    from autoseg.synth import TASKS, generate

    for task in TASKS:
        assert _check(generate(task, tmp_path / task, size="tiny", seed=0, jobs=1)) == [], task


def test_one_rgb_png_for_three_channels_is_valid_as_in_nnunet(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", shape=(16, 16), ending=".png")
    _edit_json(root, channel_names={"0": "R", "1": "G", "2": "B"})
    for path in (root / "imagesTr").iterdir():
        rgb = np.repeat(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[..., None], 3, axis=-1)
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    assert _check(root) == []


def test_label_that_is_all_background_is_fine(ds):
    _rewrite_label(_label(ds), lambda seg, g: (np.zeros_like(seg), g))
    assert _check(ds) == []


def test_geometry_difference_within_tolerance_is_fine(ds):
    _rewrite_label(_label(ds), lambda seg, g: (seg, dataclasses.replace(
        g, spacing=(2.0000001, 1.0, 1.0), origin=(1e-6, 0.0, 0.0))))
    assert _check(ds) == []


# --- dataset.json --------------------------------------------------------------------------------------


def test_missing_dataset_folder_is_a_problem_not_an_exception(tmp_path):
    p = _only(_check(tmp_path / "nowhere"))
    assert p.where == str(tmp_path / "nowhere") and "not found" in p.message


def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    p = _only(_check(ds))
    assert p.where == str(ds / "dataset.json") and "missing" in p.message


def test_unparsable_dataset_json(ds):
    (ds / "dataset.json").write_text('{"labels": {"background": 0,}')
    p = _only(_check(ds))
    assert p.where == str(ds / "dataset.json") and "not valid JSON" in p.message


@pytest.mark.parametrize("key", ["channel_names", "labels", "numTraining", "file_ending"])
def test_dataset_json_lacking_a_required_key(ds, key):
    _edit_json(ds, **{key: None})
    p = _only(_check(ds))
    assert p.where == str(ds / "dataset.json") and f"'{key}'" in p.message


def test_labels_not_starting_with_background_zero(ds):
    _edit_json(ds, labels={"outer": 1, "inner": 2})
    problems = _check(ds)
    assert {p.where for p in problems} == {str(ds / "dataset.json")}
    assert any("background = 0" in p.message for p in problems)


def test_labels_not_consecutive(ds):
    _edit_json(ds, labels={"background": 0, "outer": 1, "inner": 3})
    problems = _check(ds)
    assert problems[0] == Problem(str(ds / "dataset.json"),
                                  "label values must be consecutive integers from 0, got [0, 1, 3]")
    # the files are still checked against the labels that are declared
    assert [p.where for p in problems[1:]] == [str(_label(ds, i)) for i in range(3)]
    assert all("value(s) 2 not declared" in p.message for p in problems[1:])


def test_num_training_different_from_cases_found(ds):
    _edit_json(ds, numTraining=5)
    p = _only(_check(ds))
    assert p.where == str(ds / "dataset.json") and "'numTraining' is 5" in p.message and "3 case(s)" in p.message


# --- layout --------------------------------------------------------------------------------------------


def test_empty_dataset(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", cases=0)
    p = _only(_check(root))
    assert p.where == str(root / "imagesTr") and "no training cases" in p.message


def test_missing_images_folder_is_reported_once(ds):
    shutil.rmtree(ds / "imagesTr")
    p = _only(_check(ds))
    assert p.where == str(ds / "imagesTr") and "missing" in p.message


def test_missing_labels_folder_is_reported_once(ds):
    shutil.rmtree(ds / "labelsTr")
    p = _only(_check(ds))
    assert p.where == str(ds / "labelsTr") and "missing" in p.message


@pytest.mark.parametrize("folder", ["imagesTr", "labelsTr"])
def test_file_whose_ending_differs_from_file_ending(ds, folder):
    src = _image(ds) if folder == "imagesTr" else _label(ds)
    nrrd = src.with_name(src.name.replace(".nii.gz", ".nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(src)), str(nrrd))
    p = _only(_check(ds))
    assert p.where == str(nrrd) and "ending .nrrd differs from file_ending .nii.gz" in p.message


def test_missing_file_names_a_file_with_another_ending(ds):
    src = _label(ds)
    sitk.WriteImage(sitk.ReadImage(str(src)), str(_label(ds, ending=".nrrd")))
    src.unlink()
    problems = _check(ds)
    assert [p.where for p in problems] == [str(_label(ds, ending=".nrrd")), str(src)]
    assert "case001.nrrd is there" in problems[1].message


def test_label_without_images_is_an_orphan(ds):
    shutil.copy(_label(ds), _label(ds, case=7))
    p = _only(_check(ds))
    assert p.where == str(_label(ds, case=7)) and "label without images" in p.message


def test_image_file_not_following_case_naming(ds):
    odd = ds / "imagesTr" / "case001.nii.gz"
    shutil.copy(_image(ds), odd)
    p = _only(_check(ds))
    assert p.where == str(odd) and "CASE_XXXX" in p.message


def test_channel_index_beyond_channel_names(ds):
    shutil.copy(_image(ds), _image(ds, channel=1))
    p = _only(_check(ds))
    assert p.where == str(_image(ds, channel=1)) and "channel index 1" in p.message and "1 channel(s)" in p.message


# --- one case ------------------------------------------------------------------------------------------


def test_missing_channel_file_names_the_expected_file(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", channels=("T1", "T2"))
    _image(root, channel=1).unlink()
    p = _only(_check(root))
    assert p.where == str(_image(root, channel=1)) and "channel 1 ('T2') of case case001" in p.message


def test_missing_label_file(ds):
    _label(ds).unlink()
    p = _only(_check(ds))
    assert p.where == str(_label(ds)) and "missing: label of case case001" in p.message


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, ending):
    root = write_tiny_dataset(tmp_path / "D", ending=ending)
    path = _image(root, ending=ending)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    p = _only(_check(root))
    assert p.where == str(path) and "truncated" in p.message


def test_file_of_garbage_bytes(ds):
    _label(ds).write_bytes(np.random.default_rng(0).bytes(300))
    p = _only(_check(ds))
    assert p.where == str(_label(ds)) and "cannot read" in p.message


def test_shape_mismatch_between_label_and_channels(ds):
    _rewrite_label(_label(ds), lambda seg, g: (seg[:, :, :-2], g))
    p = _only(_check(ds))
    assert p.where == str(_label(ds)) and "shape (12, 16, 14) differs from (12, 16, 16)" in p.message


def test_shape_mismatch_between_channels(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", channels=("T1", "T2"))
    _rewrite_image(_image(root, channel=1), lambda a, g: (a[1:], g))
    p = _only(_check(root))
    assert p.where == str(_image(root, channel=1)) and "of case001_0000.nii.gz" in p.message


@pytest.mark.parametrize("field, value", [("spacing", (2.5, 1.0, 1.0)), ("origin", (0.0, 0.0, 5.0)),
                                          ("direction", (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))])
def test_geometry_mismatch_between_label_and_image(ds, field, value):
    _rewrite_label(_label(ds), lambda seg, g: (seg, dataclasses.replace(g, **{field: value})))
    p = _only(_check(ds))
    assert p.where == str(_label(ds)) and "geometry differs from case001_0000.nii.gz" in p.message
    assert f": {field} (" in p.message


def test_label_values_not_declared_are_named(ds):
    _rewrite_label(_label(ds), lambda seg, g: (np.where(seg == 2, 7, seg).astype(np.uint8), g))
    seg, _ = read_label(_label(ds, case=2))
    seg[0, 0, :2] = [3, 9]
    write_label(seg, Geometry((2.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel())), _label(ds, case=2))
    problems = _check(ds)
    assert [p.where for p in problems] == [str(_label(ds, 1)), str(_label(ds, 2))]
    assert "value(s) 7 not declared" in problems[0].message and "value(s) 3, 9 not declared" in problems[1].message


def test_non_integer_label_values(ds):
    seg, g = read_label(_label(ds))
    write_image(seg.astype(np.float32) * 0.5, g, _label(ds))
    p = _only(_check(ds))
    assert p.where == str(_label(ds)) and "non-integer" in p.message


@pytest.mark.parametrize("ending", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("bad, words", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf")])
def test_nan_or_inf_in_an_image(tmp_path, ending, bad, words):
    root = write_tiny_dataset(tmp_path / "D", ending=ending)

    def poison(a, g):
        a[3, 4, 5] = bad
        return a, g
    _rewrite_image(_image(root, ending=ending), poison)
    p = _only(_check(root))
    assert p.where == str(_image(root, ending=ending)) and words in p.message
    # ITK reads a NIfTI file's NaN and Inf as 0: only the stored bytes show them
    assert ("silently turns into 0" in p.message) == (ending == ".nii.gz")


def test_4d_image_where_3d_is_expected(ds):
    arr, _ = read_image(_image(ds))
    volume = sitk.GetImageFromArray(arr[0])
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(_image(ds)))
    p = _only(_check(ds))
    assert p.where == str(_image(ds)) and "is 4D" in p.message


def test_dataset_mixing_2d_and_3d_cases(ds):
    g2 = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    write_image(np.zeros((16, 16), np.float32), g2, _image(ds))
    write_label(np.zeros((16, 16), np.uint8), g2, _label(ds))
    p = _only(_check(ds))
    assert p.where == str(_image(ds)) and "is 2D but 2 case(s) are 3D" in p.message


# --- imagesTs ------------------------------------------------------------------------------------------


def test_test_images_need_no_label_but_are_checked(tmp_path):
    root = write_tiny_dataset(tmp_path / "D", channels=("T1", "T2"))
    shutil.copytree(root / "imagesTr", root / "imagesTs")
    (root / "imagesTs" / "case000_0001.nii.gz").unlink()
    _rewrite_image(root / "imagesTs" / "case002_0000.nii.gz", lambda a, g: (np.full_like(a, np.nan), g))
    problems = _check(root)
    assert [p.where for p in problems] == [str(root / "imagesTs" / "case000_0001.nii.gz"),
                                           str(root / "imagesTs" / "case002_0000.nii.gz")]
    assert "missing: channel 1" in problems[0].message and "NaN" in problems[1].message


# --- all at once, in parallel, from the command line ---------------------------------------------------


def _break_two_things(root: Path) -> list[Path]:
    """Remove case 0's label and put NaN into case 2's image; return the two files, in report order."""
    _label(root, 0).unlink()
    _rewrite_image(_image(root, 2), lambda a, g: (np.full_like(a, np.nan), g))
    return [_image(root, 2), _label(root, 0)]


def test_all_problems_are_reported_at_once_sorted_by_case(ds):
    broken = _break_two_things(ds)
    problems = _check(ds)
    assert [p.where for p in problems] == [str(broken[1]), str(broken[0])]


def test_dataset_json_and_file_problems_are_reported_together(ds):
    _edit_json(ds, numTraining=4)
    _label(ds).unlink()
    assert [p.where for p in _check(ds)] == [str(ds / "dataset.json"), str(_label(ds))]


def test_process_pool_gives_the_same_problems_and_a_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(parallel, "SMALL_BYTES", 0)  # a pool even for tiny data
    root = write_tiny_dataset(tmp_path / "D", cases=10, shape=(6, 8, 8))
    _break_two_things(root)
    serial = validate_dataset(root, jobs=1)
    assert len(serial) == 2
    assert validate_dataset(root, jobs=2, progress=True) == serial
    assert "10/10" in capsys.readouterr().err


def test_cli_reports_one_line_per_problem_and_exit_code_2(ds, capsys):
    from autoseg.cli import run

    assert run(["-q", "validate", str(ds)]) == 0
    assert "OK" in capsys.readouterr().out
    broken = _break_two_things(ds)
    assert run(["-q", "validate", str(ds)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(": ")[0] for ln in lines[:2]] == [str(broken[1]), str(broken[0])]
    assert "2 problem(s)" in lines[2] and len(lines) == 3


def test_console_script_on_a_broken_dataset(ds):
    script = Path(sys.executable).with_name("autoseg")
    broken = _break_two_things(ds)
    out = subprocess.run([str(script), "validate", str(ds)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(str(ds))]
    assert [ln.split(": ")[0] for ln in lines] == [str(broken[1]), str(broken[0])]


@pytest.mark.parametrize("labels, order, expected", [
    ({"background": 0, "whole": [1, 2], "core": [2]}, [2, 1], "does not map regions back to labels"),
    ({"background": 0, "whole": [1, 2], "core": []}, [1, 2], "label 'core' is an empty region ([])"),
    ({"background": 0, "whole": [1, 2], "core": [2, 2]}, [1, 2], "region 'core' lists a value twice"),
    ({"background": 0, "whole": [1, 2], "core": [1, 2]}, [1, 2], "regions 'whole' and 'core' are the same values"),
    ({"background": 0, "whole": [1, 2], "core": [2]}, [1, 7], "'regions_class_order' [1, 7] holds 7"),
])
def test_cli_names_a_region_definition_that_cannot_train_in_one_line(tmp_path, capsys, labels, order, expected):
    from autoseg.cli import run

    ds = write_tiny_dataset(tmp_path / "Dataset009_Regions")
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "labels": labels, "regions_class_order": order}))
    assert run(["-q", "validate", str(ds)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{ds / 'dataset.json'}: ") and expected in lines[0], lines
    (ds / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "whole": [1, 2], "core": [2]},
                                                 "regions_class_order": [1, 2]}))
    assert run(["-q", "validate", str(ds)]) == 0
