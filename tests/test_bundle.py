"""The bundle: what it holds, that predicting from it anywhere equals predicting from the workdir, that
loading it refuses tampered, pickled, escaping, unknown-version and truncated files, the input contract,
the Python API, and that ``autoseg train`` ends by writing it.

Models are random-init networks (as in test_predict): the plumbing is what is tested.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import input_files, make_workdir

import autoseg
from autoseg.artifacts import dumps_json, sha256_bytes, write_json
from autoseg.bundle import load_bundle, pack_bundle
from autoseg.bundle.archive import MANIFEST, may_be_pickle
from autoseg.cli import run
from autoseg.errors import UserError
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference import Predictor
from autoseg.io import Geometry, read_image, read_label, write_image
from autoseg.schema.plans import Normalization, Plans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A ct workdir whose plans leave the ct statistics to the fingerprint, with a selection (one rule)
    and one fold's out-of-fold summary; returns (dataset, workdir, bundle)."""
    root = tmp_path_factory.mktemp("bundle")
    ds, work, plans = make_workdir(root, "ct-aniso", "3d_fullres", 3, [8, 16, 16], [1, 2], cases=3)
    extract_fingerprint(ds, jobs=1).save(work / "fingerprint.json")
    cfg = plans.configurations["3d_fullres"]
    blank = [Normalization("ct") for _ in cfg.normalization]
    replace(plans, configurations={"3d_fullres": replace(cfg, normalization=blank)}).save(work / "plans.json")
    dice = {"liver": 0.8, "tumour": 0.4}
    write_json({"configuration": "3d_fullres", "ensemble": ["3d_fullres"],
                "cv": {"3d_fullres": {"folds": [0, 1], "cases": 3, "mean_dice": dice, "foreground_mean_dice": 0.6}},
                "postprocessing": [{"rule": "largest_component", "classes": [1, 2]}],
                "postprocessing_tuning": {"foreground_mean_dice_after": 0.65}}, work / "selection.json")
    write_json({"mean_dice": dice, "foreground_mean_dice": 0.6, "cases": {"a": {}, "b": {}}},
               work / "runs/3d_fullres/fold_0/validation/summary.json")
    return ds, work, pack_bundle(work)


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of bundle ``src`` with ``change(members, manifest)`` applied (manifest re-serialized)."""
    m = members(src)
    manifest = json.loads(m.pop(MANIFEST))
    change(m, manifest)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr(MANIFEST, dumps_json(manifest))
        for name, data in m.items():
            z.writestr(name, data)
    return dst


def listed(manifest: dict, name: str, data: bytes) -> None:
    manifest["members"][name] = {"sha256": sha256_bytes(data), "bytes": len(data)}


# --- what the bundle holds --------------------------------------------------------------------------


def test_bundle_holds_json_safetensors_and_a_card_with_checksums_and_the_input_contract(trained):
    _, work, bundle = trained
    m = members(bundle)
    assert sorted(m) == ["README.md", "manifest.json", "plans.json", "postprocessing.json",
                         "weights/3d_fullres/fold_0.safetensors", "weights/3d_fullres/fold_1.safetensors"]
    manifest = json.loads(m["manifest.json"])
    assert manifest["format_version"] == "1.0" and manifest["torch_version"] and manifest["numpy_version"]
    assert manifest["input"]["channels"] == [{"index": 0, "name": "CT", "file": "CASE_0000.nii.gz"}]
    assert manifest["input"]["ndim"] == 3 and manifest["input"]["labels"]["tumour"] == 2
    assert manifest["configurations"] == {"3d_fullres": {"folds": [0, 1]}}
    assert manifest["postprocessing"] == [{"rule": "largest_component", "classes": [1, 2]}]
    assert manifest["cv"]["folds"]["3d_fullres"]["0"]["foreground_mean_dice"] == 0.6
    for name, data in m.items():
        if name != "manifest.json":
            assert manifest["members"][name]["sha256"] == sha256_bytes(data)
        assert not may_be_pickle(name, data)  # JSON, Markdown, safetensors
    norm = json.loads(m["plans.json"])["configurations"]["3d_fullres"]["normalization"][0]
    assert None not in (norm["clip_low"], norm["clip_high"], norm["mean"], norm["std"])  # filled from the fingerprint
    card = m["README.md"].decode()
    assert "liver" in card and "| 0 | CT |" in card and "0.800" in card and "largest_component" in card


def test_predicting_from_the_bundle_elsewhere_equals_the_workdir_bit_for_bit(trained, tmp_path, monkeypatch):
    ds, work, bundle = trained
    images = tmp_path / "in"
    shutil.copytree(ds / "imagesTs", images)
    assert run(["-q", "predict", str(work), str(images), str(tmp_path / "from_work"), "--mirror", "on"]) == 0
    away = tmp_path / "elsewhere"  # no workdir, no dataset: only the bundle and the images
    away.mkdir()
    shutil.copy(bundle, away / "model.autoseg")
    monkeypatch.chdir(away)
    copy_of_work = tmp_path / "gone"
    shutil.move(work, copy_of_work)  # the workdir is not there while the bundle predicts
    try:
        assert run(["-q", "predict", "model.autoseg", str(images), "out", "--mirror", "on"]) == 0
    finally:
        shutil.move(copy_of_work, work)
    for p in sorted((tmp_path / "from_work").iterdir()):
        a, ga = read_label(p)
        b, gb = read_label(away / "out" / p.name)
        assert np.array_equal(a, b) and ga == gb


def test_info_prints_the_card_and_verify_says_ok(trained, capsys):
    _, _, bundle = trained
    assert run(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# autoseg model: synth-ct-aniso") and "tumour" in out
    assert run(["verify", str(bundle)]) == 0
    assert "OK" in capsys.readouterr().out


def test_bundle_command_writes_where_asked(trained, tmp_path, capsys):
    _, work, _ = trained
    assert run(["bundle", str(work), "-o", str(tmp_path / "m.autoseg")]) == 0
    assert load_bundle(tmp_path / "m.autoseg").configuration == "3d_fullres"


# --- security: each refusal is one line and exit code 2 ----------------------------------------------


def _tamper_checksum(m, manifest):
    m["plans.json"] = m["plans.json"].replace(b'"folds": 2', b'"folds": 3')  # same size, other bytes


def _escape_dotdot(m, manifest):
    m["../evil.json"] = b"{}"
    listed(manifest, "../evil.json", b"{}")


def _escape_absolute(m, manifest):
    m["/tmp/evil.json"] = b"{}"
    listed(manifest, "/tmp/evil.json", b"{}")


PICKLED = pickle.dumps({"x": 1}, protocol=4)


def _pickle_pt(m, manifest):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    m["weights/3d_fullres/fold_2.pt"] = buf.getvalue()
    listed(manifest, "weights/3d_fullres/fold_2.pt", buf.getvalue())


def _pickle_bytes(m, manifest):
    m["postprocessing.json"] = PICKLED  # a harmless name, listed with the right checksum, pickle inside
    listed(manifest, "postprocessing.json", PICKLED)


def _unlisted(m, manifest):
    m["notes.json"] = b"{}"


def _major_version(m, manifest):
    manifest["format_version"] = "2.0"


@pytest.mark.parametrize("change, reason", [
    (_tamper_checksum, "does not match its sha256"),
    (_escape_dotdot, "escapes the bundle"),
    (_escape_absolute, "escapes the bundle"),
    (_pickle_pt, "may be a pickle"),
    (_pickle_bytes, "starts like a pickle"),
    (_unlisted, "not listed in manifest.json"),
    (_major_version, "bundle format 2.0 is not supported"),
], ids=["checksum", "dotdot", "absolute", "pt-member", "pickle-header", "unlisted", "major-version"])
def test_loading_refuses_tampered_bundles_with_one_line_and_exit_2(trained, tmp_path, capsys, change, reason):
    _, _, bundle = trained
    bad = rewrite(bundle, tmp_path / "bad.autoseg", change)
    with pytest.raises(UserError, match=reason):
        load_bundle(bad)
    assert run(["verify", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoseg: error: ") and reason in err[0]
    assert run(["-q", "predict", str(bad), str(tmp_path), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_truncated_bundle_is_refused(trained, tmp_path, capsys):
    _, _, bundle = trained
    data = bundle.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / "cut.autoseg"
        bad.write_bytes(data[:cut])
        assert run(["verify", str(bad)]) == 2
        assert "truncated or damaged" in capsys.readouterr().err


def test_a_damaged_member_is_refused(trained, tmp_path, capsys):
    _, _, bundle = trained
    data = bytearray(bundle.read_bytes())
    at = data.find(b"weights/3d_fullres/fold_0.safetensors") + 200  # inside the stored weights
    data[at] ^= 0xFF
    bad = tmp_path / "flip.autoseg"
    bad.write_bytes(bytes(data))
    assert run(["verify", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("autoseg: error: ")


# --- the input contract at predict time ---------------------------------------------------------------


def test_cases_breaking_the_input_contract_are_named_and_the_others_predicted(trained, tmp_path, capsys):
    ds, _, bundle = trained
    good = input_files(ds)[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "good_0000.nii.gz")
    img, g = read_image(good)
    shutil.copy(good, folder / "extra_0000.nii.gz")
    shutil.copy(good, folder / "extra_0001.nii.gz")  # one channel too many
    shutil.copy(good, folder / "missing_0001.nii.gz")  # channel 0 missing
    write_image(img[0, 0], Geometry.identity(2), folder / "flat_0000.nii.gz")  # 2D for a 3D model
    assert run(["-q", "predict", str(bundle), str(folder), str(tmp_path / "out"), "--mirror", "off"]) == 2
    err = capsys.readouterr().err
    assert "extra_0001.nii.gz" in err and "missing_0000.nii.gz" in err and "flat" in err and "2D image" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


# --- Python API -------------------------------------------------------------------------------------------


def test_load_bundle_predict_takes_an_array_or_a_path_and_matches_the_workdir(trained):
    ds, work, bundle = trained
    image = input_files(ds)[0]
    images, geometry = read_image(image)
    b = autoseg.load_bundle(bundle)
    seg, g = b.predict(images, geometry, mirror="off")
    expected, _ = Predictor.from_workdir(work, mirror="off").predict_case(images, geometry)
    assert g == geometry and np.array_equal(seg, expected)
    seg_path, g_path = b.predict(image, mirror="off")
    assert np.array_equal(seg_path, expected) and g_path == geometry
    seg_default, g_default = b.predict(images, mirror="off")  # no geometry: the model's spacing is assumed
    assert seg_default.shape == images.shape[1:] and g_default.spacing == b.default_geometry(3).spacing


def test_asking_for_a_fold_the_bundle_lacks_is_a_user_error(trained):
    with pytest.raises(UserError, match="fold 4 of '3d_fullres' is not in the bundle"):
        load_bundle(trained[2]).predictor(folds=[4])


# --- autoseg train ends with the bundle ---------------------------------------------------------------------


def test_train_writes_model_autoseg_after_selection(tmp_path):
    from test_train import tiny_plans

    from autoseg.preprocess import preprocess
    from autoseg.synth import generate
    from autoseg.workflow import train_dataset

    ds = generate("mri-nested", tmp_path / "ds", size="tiny", seed=1)
    fp = extract_fingerprint(ds, jobs=1)
    work = tmp_path / "work"
    plans = tiny_plans(fp, steps=2)
    plans.save(work / "plans.json")
    fp.save(work / "fingerprint.json")
    preprocess(ds, work, plans, fp, jobs=1)
    train_dataset(ds, work, fold="0", steps=2, workers=0, device="cpu", progress=False)
    b = load_bundle(work / "model.autoseg")
    assert sorted(b.weights["3d_fullres"]) == [0]  # only the trained fold
    assert b.manifest["cv"]["selection"]["3d_fullres"]["folds"] == [0]
    assert isinstance(Plans.from_dict(json.loads(members(work / "model.autoseg")["plans.json"])), Plans)
