"""`autoseg evaluate` with lesion-wise metrics: instance classes from dataset.json or --lesion-classes, instances
from PRED/instances/ and the reference's sibling instancesTs/ or from connected components, metrics.json/.csv,
bad instance files, and the report's instance overlays."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import EXIT_BAD_INPUT, run
from autoseg.evaluate import evaluate_folder
from autoseg.io import Geometry, write_image, write_label

GEOM = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
LABELS = {"background": 0, "nucleus": 1, "debris": 2}


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Two touching nuclei (one component, two instances), a lone nucleus and a debris blob."""
    label = np.zeros((24, 32), np.uint8)
    ids = np.zeros(label.shape, np.int32)
    label[2:8, 2:14] = 1
    ids[2:8, 2:8], ids[2:8, 8:14] = 1, 2
    label[14:20, 20 + i:26 + i] = 1
    ids[14:20, 20 + i:26 + i] = 5
    label[16:20, 4:8] = 2
    return label, ids


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    """dataset/ (labelsTs + instancesTs + imagesTs + dataset.json with instance_classes) and preds/ with
    the reference copied as the prediction (semantic map only)."""
    root, preds = tmp_path / "dataset", tmp_path / "preds"
    for i in range(2):
        label, ids = _case(i)
        write_label(label, GEOM, root / "labelsTs" / f"c{i}.png")
        write_label(ids, GEOM, root / "instancesTs" / f"c{i}.png")
        write_image(label * 80.0 + 20, GEOM, root / "imagesTs" / f"c{i}_0000.png")
        write_label(label, GEOM, preds / f"c{i}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "microscopy"}, "labels": LABELS, "numTraining": 0, "file_ending": ".png",
        "instance_classes": ["nucleus"]}))
    return root, preds


def test_semantic_prediction_is_scored_by_its_connected_components(data):
    root, preds = data
    r = evaluate_folder(preds, root / "labelsTs", root / "dataset.json", jobs=1)
    setup = r["lesionwise"]
    assert setup["classes"] == {"nucleus": 1} and setup["reference_instances"].endswith("instancesTs")
    assert setup["prediction_instances"] == "connected components of each class"
    case = r["cases"]["c0"]["lesionwise"]["nucleus"]["iou"]
    # the touching pair is one predicted component: IoU 0.5 with each, so both missed and the component false
    assert (case["n_ref"], case["n_pred"], case["tp"], case["fn"], case["fp"]) == (3, 2, 1, 2, 1)
    pooled = r["lesionwise"]["summary"]["nucleus"]["iou"]["pooled"]
    assert pooled["tp"] == 2 and pooled["pq"] == pytest.approx(2 / (2 + 0.5 * (2 + 4)))
    assert "debris" not in r["cases"]["c0"]["lesionwise"]


def test_prediction_instances_are_used_when_present(data):
    root, preds = data
    shutil.copytree(root / "instancesTs", preds / "instances")
    r = evaluate_folder(preds, root / "labelsTs", root / "dataset.json", jobs=1)
    assert r["lesionwise"]["summary"]["nucleus"]["iou"]["pooled"]["pq"] == 1.0
    assert r["lesionwise"]["prediction_instances"].endswith("instances")


def test_cli_lesion_classes_csv_and_report(data, tmp_path, capsys):
    root, preds = data
    argv = ["evaluate", str(preds), str(root / "labelsTs"), "--dataset-json", str(root / "dataset.json"),
            "--lesion-classes", "debris", "--report", "--images", str(root / "imagesTs"), "-j", "1"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"nucleus\s+iou\s+6\s+2\s+2", out) and re.search(r"debris\s+iou\s+2\s+2\s+0", out)
    rows = list(csv.DictReader(open(preds / "metrics.csv")))
    nucleus = next(r for r in rows if r["case"] == "c0" and r["class"] == "nucleus")
    assert nucleus["lesion_tp"] == "1" and nucleus["lesion_fn"] == "2" and nucleus["brats_tp"] == "3"
    html = (preds / "report.html").read_text()
    assert "<h2>Lesion-wise</h2>" in html and 'alt="lesions nucleus c0"' in html and 'alt="lesions debris' in html


def test_lesion_classes_without_a_dataset_json_are_label_values(data):
    root, preds = data
    r = evaluate_folder(preds, root / "labelsTs", lesion_classes=["1"], jobs=1)
    assert r["lesionwise"]["summary"]["1"]["iou"]["pooled"]["n_ref"] == 6  # instancesTs found beside labelsTs


@pytest.mark.parametrize("argv, message", [
    (["--lesion-classes", "tumour"], "--lesion-classes: 'tumour' is not a class of"),
    (["--ref-instances", "nowhere"], "nowhere: reference instance folder not found"),
])
def test_bad_lesion_arguments_exit_2_with_one_line(data, capsys, argv, message):
    root, preds = data
    assert run(["evaluate", str(preds), str(root / "labelsTs"), "--dataset-json", str(root / "dataset.json"),
                "-j", "1", *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_missing_or_misplaced_instance_map_exits_2_naming_it(data, capsys):
    root, preds = data
    shutil.copytree(root / "instancesTs", preds / "instances")
    (preds / "instances" / "c1.png").unlink()
    argv = ["evaluate", str(preds), str(root / "labelsTs"), "--dataset-json", str(root / "dataset.json"), "-j", "1"]
    assert run(argv) == EXIT_BAD_INPUT
    assert "instances/c1.png: instance map missing" in capsys.readouterr().err
    write_label(np.zeros((24, 30), np.int32), GEOM, preds / "instances" / "c1.png")
    assert run(argv) == EXIT_BAD_INPUT
    assert "instances/c1.png: instance map not on the grid" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s on a loaded machine (predicting 2D nuclei through a random-weights workdir)
def test_what_autoseg_predict_writes_is_scored_lesion_by_lesion(tmp_path):
    """A nuclei workdir (random weights): `autoseg predict` writes semantic maps only; `autoseg evaluate` scores
    the instance classes on their connected components against instancesTs."""
    from test_predict import make_workdir

    ds, work, _ = make_workdir(tmp_path, "nuclei", "2d", 2, [32, 32], [0, 1], cases=2)
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--folds", "0"]) == 0
    assert not (out / "instances").exists()
    r = evaluate_folder(out, ds / "labelsTs", ds / "dataset.json", jobs=1)
    assert set(r["lesionwise"]["classes"]) == {"round_nucleus", "elongated_nucleus"}
    assert r["lesionwise"]["prediction_instances"] == "connected components of each class"
    pooled = r["lesionwise"]["summary"]["round_nucleus"]["iou"]["pooled"]
    assert pooled["n_ref"] > 10 and pooled["tp"] + pooled["fn"] == pooled["n_ref"]
