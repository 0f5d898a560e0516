"""report.html: self-contained (embedded PNGs), summary and per-case tables, best/median/worst overlays,
training curves from a workdir, the `evaluate --report` flag, 2D PNG cases and a missing images folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import run
from autoseg.evaluate import evaluate_folder
from autoseg.io import Geometry, write_image, write_label
from autoseg.report import pick_cases, ranked_cases, write_report

GEOM = Geometry((3.0, 1.0, 0.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel().tolist()))
PNG_URI = re.compile(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"')


def _case(shift: int, shape=(6, 10, 12)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, reference, prediction): a box with a core; the prediction is shifted by ``shift`` voxels."""
    ref = np.zeros(shape, np.uint8)
    ref[1:5, 2:8, 3:10] = 1
    ref[2:4, 4:6, 5:8] = 2
    pred = np.roll(ref, shift, axis=2)
    image = ref * 50.0 + np.random.default_rng(shift).normal(0, 5, shape)
    return image.astype(np.float32), ref, pred


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """preds/, refs/ and images/ with four 3D cases of rising error (c0 best, c3 worst)."""
    pred_dir, ref_dir, img_dir = tmp_path / "preds", tmp_path / "refs", tmp_path / "images"
    for i in range(4):
        image, ref, pred = _case(i)
        write_label(ref, GEOM, ref_dir / f"c{i}.nii.gz")
        write_label(pred, GEOM, pred_dir / f"c{i}.nii.gz")
        write_image(image, GEOM, img_dir / f"c{i}_0000.nii.gz")
    return pred_dir, ref_dir, img_dir


def _pngs(text: str) -> int:
    return len(PNG_URI.findall(text))


def _well_formed(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<table>") == text.count("</table>") >= 2
    assert text.count("<tr>") == text.count("</tr>")
    assert "<script" not in text and "http://" not in text and "https://" not in text


def test_report_has_tables_case_names_summary_numbers_and_three_overlays(dataset, tmp_path):
    pred_dir, ref_dir, img_dir = dataset
    metrics = evaluate_folder(pred_dir, ref_dir, jobs=1)
    out = write_report(metrics, pred_dir, ref_dir, tmp_path / "report.html", images_dir=img_dir)
    text = out.read_text()
    _well_formed(text)
    for case in metrics["cases"]:
        assert f"<td>{case}</td>" in text
    assert f"{metrics['summary']['per_class']['1']['dice']['mean']:.4f}" in text
    assert f"{metrics['summary']['foreground_mean']['hd95_mm']:.2f}" in text
    assert _pngs(text) == 3
    assert "image c0_0000.nii.gz" in text
    assert [c for _, c, _ in pick_cases(metrics)] == ["c0", "c2", "c3"]
    rows = re.findall(r"<tr><td>(c\d)</td>", text)
    assert rows == [c for c, _ in ranked_cases(metrics)] == ["c0", "c1", "c2", "c3"]


def test_fewer_cases_give_fewer_overlays(dataset, tmp_path):
    pred_dir, ref_dir, _ = dataset
    for i in (1, 2, 3):
        (ref_dir / f"c{i}.nii.gz").unlink()
    metrics = evaluate_folder(pred_dir, ref_dir, jobs=1)
    text = write_report(metrics, pred_dir, ref_dir, tmp_path / "r.html").read_text()
    _well_formed(text)
    assert _pngs(text) == 1


def test_missing_images_folder_falls_back_to_the_label_map(dataset, tmp_path):
    pred_dir, ref_dir, _ = dataset
    metrics = evaluate_folder(pred_dir, ref_dir, jobs=1)
    text = write_report(metrics, pred_dir, ref_dir, tmp_path / "r.html", images_dir=tmp_path / "nowhere").read_text()
    _well_formed(text)
    assert _pngs(text) == 3
    assert "not found" in text and "no image found" in text


def test_workdir_curves_are_embedded(dataset, tmp_path):
    from autoseg.trainlog import TrainLog
    from autoseg.workdir import Workdir

    pred_dir, ref_dir, _ = dataset
    run = Workdir(tmp_path / "work").run("3d", 0)
    run.folder.mkdir(parents=True)
    log = TrainLog(run, {1: "outer"})
    for step in (10, 20):
        log.append({"step": step, "elapsed_s": 1.0, "lr": 0.01, "loss": 1.0 / step, "val_dice_mean": 0.5,
                    "val_dice_outer": 0.5})
    log.plot()
    metrics = evaluate_folder(pred_dir, ref_dir, jobs=1)
    text = write_report(metrics, pred_dir, ref_dir, tmp_path / "r.html", workdir=tmp_path / "work").read_text()
    _well_formed(text)
    assert "3d fold 0" in text and "last step 20" in text
    assert "<td>outer</td><td>10</td><td>1</td><td>50%</td>" in text  # learned (Dice 0.5) at the first validation
    assert _pngs(text) == 4


def test_2d_png_case(tmp_path):
    pred_dir, ref_dir, img_dir = tmp_path / "p", tmp_path / "r", tmp_path / "i"
    g2 = Geometry.identity(2)
    ref = np.zeros((20, 30), np.uint8)
    ref[5:15, 8:22] = 1
    write_label(ref, g2, ref_dir / "img1.png")
    write_label(np.roll(ref, 2, axis=1), g2, pred_dir / "img1.png")
    write_image(ref * 200.0, g2, img_dir / "img1_0000.png")
    metrics = evaluate_folder(pred_dir, ref_dir, jobs=1)
    text = write_report(metrics, pred_dir, ref_dir, tmp_path / "r.html", images_dir=img_dir).read_text()
    _well_formed(text)
    assert _pngs(text) == 1 and "img1" in text and "image img1_0000.png" in text


def test_cli_report_flag_writes_report_beside_metrics(dataset, capsys):
    pred_dir, ref_dir, img_dir = dataset
    assert run(["evaluate", str(pred_dir), str(ref_dir), "--report", "--images", str(img_dir), "-q", "-j", "1"]) == 0
    report = pred_dir / "report.html"
    assert report.is_file() and (pred_dir / "metrics.json").is_file()
    assert str(report) in capsys.readouterr().out
    metrics = json.loads((pred_dir / "metrics.json").read_text())
    text = report.read_text()
    _well_formed(text)
    assert all(case in text for case in metrics["cases"]) and _pngs(text) == 3
