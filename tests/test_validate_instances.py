"""``autoseg validate`` on instance datasets: instancesTr/ and dataset.json's instance_classes, broken one way each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset

from autoseg.cli import run
from autoseg.errors import Problem
from autoseg.io import Geometry, read_label, write_label
from autoseg.validate import validate_dataset


def _only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    """The tiny dataset (a box of 'outer' with a cube of 'inner' in it) with one instance per class per case."""
    root = write_tiny_dataset(tmp_path / "Dataset001_Inst")
    (root / "instancesTr").mkdir()
    for path in sorted((root / "labelsTr").iterdir()):
        seg, geometry = read_label(path)
        write_label(np.where(seg == 1, 3, np.where(seg == 2, 7, 0)), geometry, root / "instancesTr" / path.name)
    meta = json.loads((root / "dataset.json").read_text())
    meta["instance_classes"] = ["outer", "inner"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _rewrite(path: Path, transform) -> None:
    ids, geometry = read_label(path)
    ids, geometry = transform(ids.astype(np.int32), geometry)
    write_label(ids, geometry, path)


def _instances(root: Path, case: int = 1) -> Path:
    return root / "instancesTr" / f"case{case:03d}.nii.gz"


def test_a_consistent_instance_dataset_has_no_problem(ds):
    assert validate_dataset(ds, jobs=1) == []


def test_instance_classes_without_instance_maps_are_fine(ds):
    for p in (ds / "instancesTr").iterdir():
        p.unlink()
    (ds / "instancesTr").rmdir()
    assert validate_dataset(ds, jobs=1) == []


def test_instance_ids_on_background(ds):
    def put(ids, g):
        ids[0, 0, 0] = 9
        return ids, g
    _rewrite(_instances(ds), put)
    p = _only(validate_dataset(ds, jobs=1))
    assert p.where.endswith("instancesTr/case001.nii.gz") and "instance id(s) 9 lie on background" in p.message


def test_one_instance_spanning_two_classes(ds):
    _rewrite(_instances(ds), lambda ids, g: (np.where(ids == 7, 3, ids), g))
    p = _only(validate_dataset(ds, jobs=1))
    assert "instance 3 spans labels 1, 2" in p.message


def test_instance_class_voxel_without_an_id(ds):
    def clear(ids, g):
        ids[ids == 7] = 0
        return ids, g
    _rewrite(_instances(ds), clear)
    p = _only(validate_dataset(ds, jobs=1))
    assert "voxel(s) of instance class(es) 'inner' have no instance id" in p.message


def test_ids_on_a_class_that_is_not_an_instance_class(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    meta["instance_classes"] = ["inner"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    problems = validate_dataset(ds, jobs=1)
    assert len(problems) == 3 and all("lie on label(s) 1, which dataset.json does not list" in p.message
                                      for p in problems)


def test_missing_instance_map(ds):
    _instances(ds, 2).unlink()
    p = _only(validate_dataset(ds, jobs=1))
    assert p.where.endswith("instancesTr/case002.nii.gz") and p.message.startswith("missing: instance map")


def test_instance_map_of_another_geometry(ds):
    def move(ids, g):
        return ids, Geometry(g.spacing, (5.0, 0.0, 0.0), g.direction)
    _rewrite(_instances(ds), move)
    assert "geometry differs from its label" in _only(validate_dataset(ds, jobs=1)).message


def test_instance_map_of_another_shape(ds):
    _rewrite(_instances(ds), lambda ids, g: (ids[:-1], g))
    assert "differs from (12, 16, 16) of its label" in _only(validate_dataset(ds, jobs=1)).message


def test_instance_classes_naming_an_unknown_class(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    meta["instance_classes"] = ["outer", "inner", "nucleus"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    p = _only(validate_dataset(ds, jobs=1))
    assert p.where.endswith("dataset.json") and "names 'nucleus', which is not a class in 'labels'" in p.message


def test_instance_maps_without_instance_classes(ds):
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["instance_classes"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    assert "has no 'instance_classes'" in _only(validate_dataset(ds, jobs=1)).message


def test_an_instance_map_without_a_case(ds):
    write_label(np.zeros((12, 16, 16), np.uint8), read_label(_instances(ds))[1], ds / "instancesTr" / "stray.nii.gz")
    assert "instance map without images" in _only(validate_dataset(ds, jobs=1)).message


def test_cli_exits_2_with_one_line_per_problem(ds, capsys):
    _rewrite(_instances(ds), lambda ids, g: (np.where(ids == 7, 3, ids), g))
    def put(ids, g):
        ids[0, 0, 0] = 9
        return ids, g
    _rewrite(_instances(ds, 2), put)
    assert run(["validate", str(ds), "-j", "1"]) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "case001.nii.gz: instance 3 spans labels 1, 2" in text
    assert "case002.nii.gz: instance id(s) 9 lie on background" in text
    assert "Traceback" not in text
