"""`autoseg evaluate` and evaluate_folder: pairing by file name, geometry checks that name the file,
metrics.json / metrics.csv, class names from dataset.json, summaries and empty-case counts, 2D PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import EXIT_BAD_INPUT, run
from autoseg.errors import UserError
from autoseg.evaluate import evaluate_folder, parse_tolerance, write_metrics
from autoseg.io import Geometry, write_label
from autoseg.metrics import compute_metrics

SPACING = (3.0, 1.0, 0.5)
GEOM = Geometry(SPACING, (10.0, -5.0, 2.0), tuple(np.eye(3).ravel().tolist()))
LABELS = {"background": 0, "outer": 1, "inner": 2}


def _maps(seed: int, shape=(8, 12, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A reference with classes 1 and 2 and a prediction that shifts and trims it."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    lo = 2 + int(rng.integers(0, 2))
    ref[lo:6, 3:9, 2:8] = 1
    ref[4, 5:7, 4:6] = 2
    pred = np.roll(ref, int(rng.integers(0, 2)), axis=2)
    pred[lo, 3:5] = 0
    return pred, ref


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, dict]:
    """preds/ and refs/ with three cases; case c2's prediction misses class 2 entirely."""
    pred_dir, ref_dir = tmp_path / "preds", tmp_path / "refs"
    arrays = {}
    for i in range(3):
        pred, ref = _maps(i)
        if i == 2:
            pred[pred == 2] = 1
        arrays[f"c{i}"] = (pred, ref)
        write_label(pred, GEOM, pred_dir / f"c{i}.nii.gz")
        write_label(ref, GEOM, ref_dir / f"c{i}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 3, "file_ending": ".nii.gz"}))
    return pred_dir, ref_dir, arrays


def _same(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b or (isinstance(a, float) and b == pytest.approx(a))


# --- the Python API --------------------------------------------------------------------------------------


def test_each_case_is_scored_as_compute_metrics_scores_its_arrays(folders):
    pred_dir, ref_dir, arrays = folders
    result = evaluate_folder(pred_dir, ref_dir, pred_dir.parent / "dataset.json", jobs=1)
    assert list(result["cases"]) == ["c0", "c1", "c2"]
    for case, (pred, ref) in arrays.items():
        expected = compute_metrics(pred, ref, {"outer": 1, "inner": 2}, SPACING)
        got = result["cases"][case]["classes"]
        assert list(got) == ["outer", "inner"]
        for name in expected:
            assert all(_same(expected[name][k], got[name][k]) for k in expected[name]), (case, name)
    assert result["cases"]["c2"]["classes"]["inner"]["empty"] == "pred"


def test_summary_statistics_leave_nan_out_and_count_empty_cases(folders):
    pred_dir, ref_dir, _ = folders
    result = evaluate_folder(pred_dir, ref_dir, pred_dir.parent / "dataset.json", jobs=1)
    s = result["summary"]
    for name in ("outer", "inner"):
        for metric in ("dice", "hd95_mm", "nsd"):
            values = [c["classes"][name][metric] for c in result["cases"].values()]
            kept = [v for v in values if not math.isnan(v)]
            stats = s["per_class"][name][metric]
            assert stats["n"] == len(kept)
            assert stats["mean"] == pytest.approx(np.mean(kept))
            assert stats["median"] == pytest.approx(np.median(kept))
            assert stats["std"] == pytest.approx(np.std(kept))
    assert s["per_class"]["inner"]["hd95_mm"]["n"] == 2  # c2 missed class 2: HD95 NaN, left out, counted
    assert (s["per_class"]["inner"]["pred_empty"], s["per_class"]["inner"]["ref_empty"]) == (1, 0)
    assert s["empty_counts"] == {"both_empty": 0, "ref_empty": 0, "pred_empty": 1}
    fg = np.mean([s["per_class"][n]["dice"]["mean"] for n in ("outer", "inner")])
    assert s["foreground_mean"]["dice"] == pytest.approx(fg)


def test_without_dataset_json_classes_are_the_values_found_anywhere(tmp_path: Path):
    pred_dir, ref_dir = tmp_path / "p", tmp_path / "r"
    a = np.zeros((4, 6, 6), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    b = a.copy()
    b[3, 4:, 4:] = 3  # class 3 only in this case
    for name, arr in (("x", a), ("y", b)):
        write_label(arr, GEOM, pred_dir / f"{name}.nii.gz")
        write_label(arr, GEOM, ref_dir / f"{name}.nii.gz")
    result = evaluate_folder(pred_dir, ref_dir, jobs=1)
    assert result["classes"] == {"1": 1, "3": 3}
    x3 = result["cases"]["x"]["classes"]["3"]
    assert x3["empty"] == "both" and math.isnan(x3["dice"]) and x3["tn"] == a.size
    assert x3["nsd_tolerance_mm"] == max(SPACING)
    assert result["summary"]["per_class"]["3"]["both_empty"] == 1
    assert result["summary"]["per_class"]["3"]["dice"] == {"mean": 1.0, "median": 1.0, "std": 0.0, "n": 1}


def test_ignore_label_and_regions_come_from_dataset_json(tmp_path: Path):
    pred_dir, ref_dir = tmp_path / "p", tmp_path / "r"
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[1:3, 1:3, 3] = 2
    ref[:, 5, :] = 9
    pred = ref.copy()
    pred[ref == 9] = 1  # predictions inside the ignore region do not count
    write_label(pred, GEOM, pred_dir / "a.nrrd")
    write_label(ref, GEOM, ref_dir / "a.nrrd")
    spec = tmp_path / "ds.json"
    spec.write_text(json.dumps({"labels": {"background": 0, "organ": [1, 2], "part": 2, "ignore": 9},
                                "file_ending": ".nrrd"}))
    result = evaluate_folder(pred_dir, ref_dir, spec, jobs=1)
    assert result["ignore_label"] == 9
    organ = result["cases"]["a"]["classes"]["organ"]
    assert organ["dice"] == 1.0 and organ["fp"] == 0 and organ["tp"] == 12
    assert organ["tn"] == ref.size - 4 * 6 - 12


def test_jobs_give_the_same_result_as_one_process(folders):
    pred_dir, ref_dir, _ = folders
    one = evaluate_folder(pred_dir, ref_dir, jobs=1)
    two = evaluate_folder(pred_dir, ref_dir, jobs=2)
    assert json.dumps(one["summary"]) == json.dumps(two["summary"])


def test_two_dimensional_png_predictions(tmp_path: Path):
    pred_dir, ref_dir = tmp_path / "p", tmp_path / "r"
    ref = np.zeros((20, 30), np.uint8)
    ref[5:15, 5:20] = 1
    pred = np.roll(ref, 2, axis=1)
    write_label(pred, Geometry.identity(2), pred_dir / "img.png")
    write_label(ref, Geometry.identity(2), ref_dir / "img.png")
    m = evaluate_folder(pred_dir, ref_dir, jobs=1)["cases"]["img"]["classes"]["1"]
    assert m["dice"] == pytest.approx(2 * 130 / 300)
    assert m["hd95_mm"] == pytest.approx(2.0) and m["volume_ref_mm3"] == 150.0


def test_metrics_files_are_written_with_nan_as_null_and_one_csv_row_per_case_and_class(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    result = evaluate_folder(pred_dir, ref_dir, pred_dir.parent / "dataset.json", jobs=1)
    json_path, csv_path = write_metrics(result, tmp_path / "out" / "m.json")
    assert csv_path == tmp_path / "out" / "m.csv"
    saved = json.loads(json_path.read_text())
    assert saved["cases"]["c2"]["classes"]["inner"]["hd95_mm"] is None
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 3 * 2 and rows[0]["case"] == "c0" and rows[0]["class"] == "outer"
    missed = next(r for r in rows if r["case"] == "c2" and r["class"] == "inner")
    assert missed["hd95_mm"] == "nan" and missed["dice"] == "0.0" and missed["empty"] == "pred"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["m.csv", "m.json"]  # no temporaries left


def test_parse_tolerance():
    assert parse_tolerance(None) is None
    assert parse_tolerance("2") == 2.0
    assert parse_tolerance("outer=2, inner=0.5") == {"outer": 2.0, "inner": 0.5}
    assert parse_tolerance("1.5,inner=0.5") == {"default": 1.5, "inner": 0.5}
    for bad in ("x", "inner=", "-1", ""):
        with pytest.raises(UserError):
            parse_tolerance(bad)


# --- the command line ------------------------------------------------------------------------------------


def test_cli_writes_metrics_beside_the_predictions_with_dataset_json_names(folders, capsys):
    pred_dir, ref_dir, _ = folders
    code = run(["evaluate", str(pred_dir), str(ref_dir), "--dataset-json", str(pred_dir.parent / "dataset.json"),
                "--nsd-tolerance", "outer=2,inner=1", "-q", "-j", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "outer" in out and "foreground mean" in out
    saved = json.loads((pred_dir / "metrics.json").read_text())
    assert list(saved["summary"]["per_class"]) == ["outer", "inner"]
    assert saved["cases"]["c0"]["classes"]["inner"]["nsd_tolerance_mm"] == 1.0
    assert (pred_dir / "metrics.csv").read_text().startswith("case,class,dice,iou,")


def test_cli_output_option_and_extra_predictions_warn(folders, tmp_path, capsys):
    pred_dir, ref_dir, arrays = folders
    write_label(arrays["c0"][0], GEOM, pred_dir / "stray.nii.gz")
    out = tmp_path / "res" / "scores.json"
    assert run(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out), "-q", "-j", "1"]) == 0
    assert out.is_file() and out.with_suffix(".csv").is_file()
    err = capsys.readouterr().err
    assert "warning" in err and "stray" in err


def _fails(args: list[str], capsys) -> str:
    assert run(["evaluate", *args, "-q", "-j", "1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_cli_missing_prediction_is_one_line_naming_the_file(folders, capsys):
    pred_dir, ref_dir, _ = folders
    (pred_dir / "c1.nii.gz").unlink()
    err = _fails([str(pred_dir), str(ref_dir)], capsys)
    assert len(err.splitlines()) == 1 and str(pred_dir / "c1.nii.gz") in err and "missing" in err


@pytest.mark.parametrize("change, words", [
    (lambda p: (p[:, :, :-1], GEOM), "shape"),
    (lambda p: (p, Geometry((2.0, 1.0, 0.5), GEOM.origin, GEOM.direction)), "spacing"),
    (lambda p: (p, Geometry(SPACING, (10.0, -5.0, 7.0), GEOM.direction)), "origin"),
])
def test_cli_geometry_mismatch_names_the_file(folders, capsys, change, words):
    pred_dir, ref_dir, arrays = folders
    arr, geom = change(arrays["c1"][0])
    write_label(arr, geom, pred_dir / "c1.nii.gz")
    err = _fails([str(pred_dir), str(ref_dir)], capsys)
    assert len(err.splitlines()) == 1 and str(pred_dir / "c1.nii.gz") in err and words in err


def test_cli_unreadable_file_names_it(folders, capsys):
    pred_dir, ref_dir, _ = folders
    (pred_dir / "c0.nii.gz").write_bytes(b"not an image")
    err = _fails([str(pred_dir), str(ref_dir)], capsys)
    assert len(err.splitlines()) == 1 and str(pred_dir / "c0.nii.gz") in err


def test_cli_bad_tolerance_and_unknown_class_are_errors(folders, capsys):
    pred_dir, ref_dir, _ = folders
    ds = str(pred_dir.parent / "dataset.json")
    assert "tolerance" in _fails([str(pred_dir), str(ref_dir), "--nsd-tolerance", "abc"], capsys)
    err = _fails([str(pred_dir), str(ref_dir), "--dataset-json", ds, "--nsd-tolerance", "liver=2"], capsys)
    assert "liver" in err
    assert "not found" in _fails([str(pred_dir / "nope"), str(ref_dir)], capsys)
