"""autoseg predict: outputs in the input's geometry (flipped/oblique directions, 2D PNG), fold ensembling,
probabilities, the input contract per case, and the same pipeline as the out-of-fold validation.

Models are random-init networks saved as ``checkpoint_final.pt``: what is tested is the plumbing, which
does not need a model that learned anything.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.checkpoint import save_checkpoint
from autoseg.cli import run
from autoseg.errors import UserError
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference import Predictor, mirror_rule
from autoseg.io import read_image, read_label, write_image
from autoseg.nets import build_network
from autoseg.plan import rules
from autoseg.schema.labels import regions_of
from autoseg.schema.plans import Augmentation, Configuration, Loss, Network, Plans
from autoseg.synth import generate
from autoseg.workdir import FINAL, Workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_plans(fp, name: str, ndim: int, patch: list[int], mirror_axes: list[int]) -> Plans:
    spacing = rules.target_spacing(fp)[-ndim:]
    k, s = [3] * ndim, [1] * ndim
    net = Network("unet", [4, 8], [k, k], [s, [2] * ndim], [1, 1], decoder_convs=1)
    cfg = Configuration(name=name, ndim=ndim, spacing=spacing, median_shape=fp.median_cropped_shape[-ndim:],
                        patch_size=patch, batch_size=2, normalization=rules.normalization(fp),
                        resampling=rules.resampling(spacing), network=net,
                        augmentation=Augmentation(mirror_axes=mirror_axes))
    if regions_of(fp.labels):  # a region dataset: one sigmoid output per region
        cfg = replace(cfg, loss=Loss("dice_bce"))
    return Plans(fp.dataset_name, fp.dataset_hash, "test", {"type": "cpu"}, 60.0, {name: cfg},
                 axis_order=list(range(fp.ndim)), channel_names=fp.channel_names, labels=fp.labels,
                 regions_class_order=list(fp.regions_class_order), file_ending=fp.file_ending, folds=2,
                 train_runs=[{"configuration": name, "fold": 0, "seconds": 1.0}])


def save_random_folds(work: Path, plans: Plans, name: str, folds=(0, 1)) -> None:
    cfg = plans.configurations[name]
    for k in folds:
        torch.manual_seed(100 + k)
        model = build_network(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim)
        folder = Workdir(work).run(name, k).folder
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(folder / FINAL, model, torch.optim.SGD(model.parameters(), lr=0.1), None, 1, {})


def make_workdir(root: Path, task: str, name: str, ndim: int, patch: list[int], mirror_axes: list[int],
                 cases: int | None = None) -> tuple[Path, Path, Plans]:
    ds = generate(task, root / "ds", size="tiny", cases=cases, seed=2)
    fp = extract_fingerprint(ds, jobs=1)
    plans = hand_plans(fp, name, ndim, patch, mirror_axes)
    work = root / "work"
    plans.save(work / "plans.json")
    save_random_folds(work, plans, name)
    return ds, work, plans


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, Path, Plans]:
    """ct-aniso: anisotropic spacing that varies per case, flipped and oblique direction cosines."""
    return make_workdir(tmp_path_factory.mktemp("ct"), "ct-aniso", "3d_fullres", 3, [8, 16, 16], [1, 2], cases=3)


def input_files(ds: Path, split: str = "Ts") -> list[Path]:
    return sorted((ds / f"images{split}").glob("*_0000*"))


def assert_same_geometry(pred: Path, image: Path) -> None:
    arr, g = read_label(pred)
    ref, g_ref = read_image(image)
    assert arr.shape == ref.shape[1:]
    assert g.spacing == g_ref.spacing and g.origin == g_ref.origin and g.direction == g_ref.direction


def test_ct_predictions_have_the_input_geometry_including_flipped_oblique_directions(ct, tmp_path):
    ds, work, plans = ct
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--mirror", "on"]) == 0
    images = input_files(ds)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name.replace("_0000", "") for p in images)
    for img in images:
        _, g = read_image(img)
        assert not np.allclose(np.reshape(g.direction, (3, 3)), np.eye(3))  # the case is not trivial
        assert_same_geometry(out / img.name.replace("_0000", ""), img)


def test_png_2d_predictions_keep_size_and_format(tmp_path):
    ds, work, _ = make_workdir(tmp_path, "png-2d", "2d", 2, [32, 32], [0, 1], cases=2)
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(out), "--folds", "0"]) == 0
    for img in input_files(ds):
        pred = out / img.name.replace("_0000", "")
        assert pred.suffix == ".png"
        assert_same_geometry(pred, img)


def test_fold_ensemble_is_the_mean_of_the_single_fold_probabilities(ct):
    ds, work, plans = ct
    from autoseg.preprocess import preprocess_case

    images, geometry = read_image(input_files(ds)[0])
    both = Predictor.from_workdir(work, mirror="off", storage="float32")
    assert both.folds == [0, 1]
    data, _, props = preprocess_case(images, geometry, both.cfg, both.plans)
    mean = both.preprocessed_probabilities(data)
    single = [Predictor.from_workdir(work, folds=[k], mirror="off", storage="float32").preprocessed_probabilities(data)
              for k in (0, 1)]
    assert not torch.allclose(single[0], single[1], atol=1e-3)
    torch.testing.assert_close(mean, (single[0] + single[1]) / 2, atol=1e-6, rtol=0)
    seg, probs = both.predict_case(images, geometry, probabilities=True)
    assert probs.shape == (plans.num_classes, *images.shape[1:]) and seg.shape == images.shape[1:]


def test_saved_probabilities_sum_to_one_and_agree_with_the_labels(ct, tmp_path):
    ds, work, plans = ct
    img = input_files(ds)[0]
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(img), str(out), "--save-probabilities", "--mirror", "off"]) == 0
    case = img.name.replace("_0000.nii.gz", "")
    probs = np.load(out / f"{case}.npz")["probabilities"]
    seg, _ = read_label(out / f"{case}.nii.gz")
    assert probs.dtype == np.float16 and probs.shape == (plans.num_classes, *seg.shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    top2 = np.sort(probs.astype(np.float32), 0)[-2:]
    clear = top2[1] - top2[0] > 2e-3  # float16 storage can tie close calls
    assert np.array_equal(probs.argmax(0)[clear], seg[clear])


def test_single_file_input_is_predicted(ct, tmp_path):
    ds, work, _ = ct
    img = input_files(ds)[1]
    assert run(["-q", "predict", str(work), str(img), str(tmp_path / "o"), "--mirror", "off"]) == 0
    assert_same_geometry(tmp_path / "o" / img.name.replace("_0000", ""), img)


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory) -> tuple[Path, Path, Plans]:
    return make_workdir(tmp_path_factory.mktemp("mr"), "mr-2ch", "3d_fullres", 3, [16, 16, 16], [], cases=2)


def test_bad_cases_get_one_error_line_each_and_the_others_are_still_predicted(two_channel, tmp_path, capsys):
    ds, work, _ = two_channel
    inp = tmp_path / "in"
    shutil.copytree(ds / "imagesTr", inp)
    (inp / "mr2ch_000_0001.nii.gz").unlink()  # a missing channel
    img, g = read_image(inp / "mr2ch_001_0000.nii.gz")
    for c in range(2):  # a 2D image for a 3D model
        write_image(img[0, 0], type(g).identity(2), inp / f"flat_{c:04d}.nii.gz")
    out = tmp_path / "out"
    assert run(["-q", "predict", str(work), str(inp), str(out), "--mirror", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("mr2ch_000" in line and "mr2ch_000_0001.nii.gz" in line and "missing" in line for line in err), err
    assert any("flat" in line and "2D" in line for line in err), err
    assert len([line for line in err if line.startswith("autoseg: error:")]) == 2, err
    assert sorted(p.name for p in out.iterdir()) == ["mr2ch_001.nii.gz"]
    assert_same_geometry(out / "mr2ch_001.nii.gz", inp / "mr2ch_001_0000.nii.gz")


def test_a_workdir_without_trained_folds_is_a_clear_error(two_channel, tmp_path, capsys):
    ds, work, _ = two_channel
    empty = tmp_path / "w"
    empty.mkdir()
    shutil.copy(work / "plans.json", empty / "plans.json")
    assert run(["-q", "predict", str(empty), str(ds / "imagesTs"), str(tmp_path / "o")]) == 2
    assert "no trained fold" in capsys.readouterr().err
    assert run(["-q", "predict", str(work), str(ds / "imagesTs"), str(tmp_path / "o"), "--folds", "3"]) == 2
    assert "fold 3 is not trained" in capsys.readouterr().err


def test_configuration_comes_from_the_flag_then_selection_json_then_the_planned_runs(two_channel, tmp_path):
    _, work, plans = two_channel
    w = tmp_path / "w"
    w.mkdir()
    assert Workdir(w).model(plans) == ["3d_fullres"]
    (w / "selection.json").write_text('{"configuration": "2d"}')
    with pytest.raises(UserError, match="selection.json: configuration '2d'"):
        Workdir(w).model(plans)
    with pytest.raises(UserError, match="--config"):
        Workdir(w).model(plans, "3d_lowres")
    assert Workdir(w).model(plans, "3d_fullres") == ["3d_fullres"]
    assert Workdir(work).trained_folds("3d_fullres") == [0, 1]


def test_mirror_auto_turns_on_only_within_the_time_limit(two_channel):
    assert mirror_rule(3.0) and not mirror_rule(300.0)
    ds, work, _ = two_channel
    p = Predictor.from_workdir(work, mirror="auto")
    images, geometry = read_image(ds / "imagesTs" / "mr2ch_ts000_0000.nii.gz")
    assert p.mirror_axes == ()
    p.predict_case(np.concatenate([images, images]), geometry)
    assert "off" in p.mirror_note and "without mirror" in p.mirror_note


def test_mirror_auto_decides_once_from_the_measured_tile_time(ct, monkeypatch):
    """4 flips x tiles x 2 folds at the measured time per tile batch, against the limit; the first case decides."""
    ds, work, _ = ct
    images, geometry = read_image(input_files(ds)[0])
    for per_batch, on in ((1e-4, True), (10.0, False)):
        p = Predictor.from_workdir(work, mirror="auto")
        monkeypatch.setattr(p, "_time_tile_batch", lambda member, v=per_batch: v)
        p.predict_case(images, geometry)
        assert p.mirror_axes == (1, 2) and p._mirror_on is on
        assert f"mirroring {'on' if on else 'off'}" in p.mirror_note and "4 flips" in p.mirror_note
        monkeypatch.setattr(p, "_time_tile_batch", lambda member: 1 / 0)  # decided: not measured again
        p.predict_case(images, geometry)


def test_parallel_export_writes_the_same_files(ct, tmp_path):
    ds, work, _ = ct
    for j in ("1", "3"):
        assert run(["-q", "predict", str(work), str(ds / "imagesTr"), str(tmp_path / j), "--mirror", "off",
                    "-j", j, "--save-probabilities"]) == 0
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "3").iterdir()) and len(names) == 6
    for name in names:
        a, b = tmp_path / "1" / name, tmp_path / "3" / name
        if name.endswith(".npz"):  # a zip records its time of writing
            assert np.array_equal(np.load(a)["probabilities"], np.load(b)["probabilities"]), name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_cases_are_grouped_from_file_names_and_contract_breaks_are_named(two_channel, tmp_path):
    from autoseg.predict_inputs import find_cases

    _, _, plans = two_channel
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz", "c_0001.nrrd",
                 "d_0000.nii.gz", "d_0001.nii.gz", "d_0002.nii.gz", "e.nii.gz", "notes.txt", ".hidden_0000.nii.gz"):
        (tmp_path / name).touch()
    cases = {c.id: c for c in find_cases(tmp_path, plans)}
    assert sorted(cases) == ["a", "b", "c", "d", "e"]
    assert cases["a"].problem is None and [p.name for p in cases["a"].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert "missing channel file(s) b_0001.nii.gz" in cases["b"].problem
    assert "different endings" in cases["c"].problem
    assert "unexpected channel file(s) d_0002.nii.gz" in cases["d"].problem
    assert "not named CASE_XXXX" in cases["e"].problem
    one = find_cases(tmp_path / "e.nii.gz", replace(plans, channel_names=["CT"]))
    assert [(c.id, c.ending, c.problem) for c in one] == [("e", ".nii.gz", None)]
