"""The synthetic task suite: valid nnU-Net v2 layout, the properties each task promises, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import run
from autoseg.dataset import load_dataset
from autoseg.errors import UserError
from autoseg.io import read_image, read_label
from autoseg.synth import SIZES, TASKS, draw_case, generate
from autoseg.synth.core import TEST_CASES
from autoseg.validate import validate_dataset

REQUIRED_TASKS = {"mri-nested", "ct-aniso", "mr-2ch", "png-2d", "vessels"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Every task generated once at tiny size (shared by the tests that only read)."""
    root = tmp_path_factory.mktemp("synth")
    return {name: generate(name, root / name, size="tiny", seed=0) for name in TASKS}


def read_case(case) -> tuple[list[np.ndarray], list, np.ndarray, object]:
    images = [read_image(p) for p in case.images]
    label, geometry = read_label(case.label)
    return [a for a, _ in images], [g for _, g in images], label, geometry


def best_interval_dice(values: np.ndarray, mask: np.ndarray, bins: int = 64) -> float:
    """The best Dice any rule ``lo <= value <= hi`` reaches for ``mask`` (intervals on quantile bins):
    one threshold on either side is a special case, so this bounds every single-threshold rule."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    n = len(edges) - 1
    inside = np.concatenate([[0], np.cumsum(np.bincount(idx[mask], minlength=n))])
    total = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=n))])
    lo, hi = np.triu_indices(n + 1, 1)
    return float((2 * (inside[hi] - inside[lo]) / (total[hi] - total[lo] + mask.sum())).max())


def test_the_required_tasks_and_sizes_are_registered_with_a_description():
    assert REQUIRED_TASKS <= set(TASKS)
    assert SIZES == ("tiny", "small", "bench")
    for spec in TASKS.values():
        assert spec.description and "\n" not in spec.description
        assert spec.cases["bench"] >= 30 and spec.cases["tiny"] <= 6


def test_bench_size_is_benchmark_scale():
    for spec in TASKS.values():
        voxels = int(np.prod(spec.shapes["bench"]))
        assert voxels >= (256 * 256 if len(spec.shapes["bench"]) == 2 else 64 * 96 * 96) * 0.9, spec.name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_dataset_is_a_consistent_nnunet_v2_layout(tiny, task):
    root, spec = tiny[task], TASKS[task]
    meta = json.loads((root / "dataset.json").read_text())
    assert {"name", "channel_names", "labels", "numTraining", "file_ending"} <= set(meta)
    ds = load_dataset(root)
    assert ds.channel_names == list(spec.channel_names)
    assert ds.labels == dict(spec.labels) and ds.file_ending == spec.file_ending
    cases = ds.cases("Tr")
    assert ds.num_training == len(cases) == spec.cases["tiny"] == len(list((root / "labelsTr").iterdir()))
    test_images = sorted((root / "imagesTs").iterdir())
    assert len(test_images) == TEST_CASES["tiny"] * ds.num_channels
    assert len(list((root / "labelsTs").iterdir())) == TEST_CASES["tiny"]
    for case in cases:
        channels, geometries, label, label_geometry = read_case(case)
        assert all(a.shape == (1, *label.shape) for a in channels), case.id
        assert label.ndim == (2 if spec.file_ending == ".png" else 3)
        assert set(np.unique(label).tolist()) <= set(ds.label_values)
        assert all(g.mismatch(label_geometry) is None for g in geometries)
        assert all(np.isfinite(a).all() for a in channels)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_class_is_present_in_most_cases_with_a_usable_volume(task):
    spec = TASKS[task]
    for size in ("tiny", "small"):
        labels = [draw_case(task, size, i).label for i in range(5)]
        for value in spec.label_values:
            volumes = [int((lab == value).sum()) for lab in labels]
            assert sum(v > 0 for v in volumes) >= 3, (size, value, volumes)
            assert min(v for v in volumes if v > 0) >= 20, (size, value, volumes)


def test_ct_task_is_anisotropic_oblique_in_hounsfield_units_with_an_absent_tumour(tiny):
    ds = load_dataset(tiny["ct-aniso"])
    assert ds.channel_names == ["CT"]
    slice_spacings, tumour_present = [], []
    for case in ds.cases("Tr"):
        (image,), (geometry,), label, _ = read_case(case)
        z, y, x = geometry.spacing
        assert 2.5 <= z <= 5.0 and 0.7 <= y <= 0.9 and y == x
        direction = np.asarray(geometry.direction).reshape(3, 3)
        assert not np.allclose(direction, np.eye(3))
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-6)
        assert image.min() >= -1024 and image.max() <= 3071
        assert np.mean(image < -900) > 0.1, "air around the body"
        assert 60 < np.median(image[0][label == 1]) < 160, "contrast-enhanced liver"
        slice_spacings.append(z)
        tumour_present.append(bool((label == 2).any()))
    assert len(set(slice_spacings)) > 1, "slice spacing varies per case"
    assert any(tumour_present) and not all(tumour_present)


def test_two_channel_task_needs_both_channels():
    """Edema is the class bright in T2, enhancing the one bright in T1; neither channel alone separates."""
    for i in range(4):
        case = draw_case("mr-2ch", "tiny", i)
        t1, t2 = (ch.astype(np.float32) for ch in case.channels)
        edema, enhancing = case.label == 1, case.label == 2
        assert t1[enhancing].mean() > 1.15 * t1[edema].mean()
        assert t2[edema].mean() > 1.15 * t2[enhancing].mean()
        for ch in (t1, t2):
            for mask in (edema, enhancing):
                assert best_interval_dice(ch.ravel(), mask.ravel()) < 0.8


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_intensity_interval_separates_a_foreground_class(task):
    """Learnable from shape and context only: the best single-threshold (or interval) rule stays far from 1."""
    spec = TASKS[task]
    for value in spec.label_values:
        scores = []
        for i in range(4):
            case = draw_case(task, "tiny", i)
            mask = case.label == value
            if mask.any():
                scores += [best_interval_dice(ch.astype(np.float32).ravel(), mask.ravel()) for ch in case.channels]
        assert np.mean(scores) < 0.85 and max(scores) < 0.9, (value, scores)


def test_generation_is_deterministic_for_a_seed(tmp_path):
    a = generate("ct-aniso", tmp_path / "a", cases=2, size="tiny", seed=7)
    b = generate("ct-aniso", tmp_path / "b", cases=2, size="tiny", seed=7)
    c = generate("ct-aniso", tmp_path / "c", cases=2, size="tiny", seed=8)
    for x, y in zip(load_dataset(a).cases(), load_dataset(b).cases()):
        (ix,), (gx,), lx, _ = read_case(x)
        (iy,), (gy,), ly, _ = read_case(y)
        assert np.array_equal(ix, iy) and np.array_equal(lx, ly) and gx == gy
    first_a, first_c = load_dataset(a).cases()[0], load_dataset(c).cases()[0]
    assert not np.array_equal(read_image(first_a.images[0])[0], read_image(first_c.images[0])[0])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_case_does_not_depend_on_how_many_are_drawn_or_in_which_order(task):
    first = draw_case(task, "tiny", 1, seed=3)
    draw_case(task, "tiny", 0, seed=3)
    again = draw_case(task, "tiny", 1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(first.channels, again.channels))
    assert np.array_equal(first.label, again.label) and first.geometry == again.geometry


def test_unknown_task_is_a_user_error_listing_the_tasks(tmp_path):
    with pytest.raises(UserError, match="ct-aniso") as err:
        generate("no-such-task", tmp_path / "x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_refuses_to_write_into_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate("png-2d", tmp_path, size="tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_regenerating_into_its_own_output_replaces_it(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()  # an existing empty folder is fine too
    generate("png-2d", out, cases=4, size="tiny")
    inode = out.stat().st_ino
    generate("png-2d", out, cases=2, size="tiny", seed=1)
    assert out.stat().st_ino == inode, "the folder itself is kept (a shell sitting in it stays valid)"
    ds = load_dataset(out)
    assert ds.num_training == len(ds.cases()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "no temporary folders left behind"


def test_cli_synth_writes_the_dataset(tmp_path, capsys):
    assert run(["synth", "mri-nested", str(tmp_path / "d"), "--size", "tiny", "--cases", "2", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_dataset(tmp_path / "d").num_training == 2


def test_validate_accepts_every_task(tiny):
    for task, root in tiny.items():
        assert validate_dataset(root, jobs=1) == [], task


@pytest.mark.parametrize("task", ["nuclei", "brain-mets", "lung-nodules"])
def test_instance_tasks_write_instance_maps_that_follow_the_labels(tiny, task):
    """instancesTr/instancesTs beside the labels; every instance-class voxel has an id, every id one class."""
    root, spec = tiny[task], TASKS[task]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["instance_classes"] == list(spec.instance_classes) and spec.instance_classes
    values = {spec.labels[name] for name in spec.instance_classes}
    counts = []
    for split in ("Tr", "Ts"):
        for path in sorted((root / f"labels{split}").iterdir()):
            label, geometry = read_label(path)
            instances, inst_geometry = read_label(root / f"instances{split}" / path.name)
            assert inst_geometry.mismatch(geometry) is None and instances.shape == label.shape
            assert np.array_equal(instances > 0, np.isin(label, list(values))), path.name
            ids = instances.ravel()
            pairs = np.unique(np.stack([ids[ids > 0], label.ravel()[ids > 0]]), axis=1)
            assert len(np.unique(pairs[0])) == pairs.shape[1], f"{path.name}: an id spans two classes"
            counts.append(len(np.unique(ids[ids > 0])))
    assert max(counts) >= (10 if task == "nuclei" else 2), counts


def test_nuclei_touch_in_clusters():
    """The point of the task: many nuclei touch another one, so one connected component holds several."""
    from scipy import ndimage
    objects = touching = components = 0
    for i in range(3):
        case = draw_case("nuclei", "small", i)
        inst = case.instances
        ids = np.unique(inst[inst > 0])
        objects += len(ids)
        components += sum(ndimage.label(case.label == v, np.ones((3, 3)))[1] for v in (1, 2))
        touching += sum(bool((ndimage.binary_dilation(inst == k) & (inst != k) & (inst > 0)).any()) for k in ids)
        assert len(case.channels) == 3 and all(ch.dtype == np.uint8 for ch in case.channels)
    assert objects >= 60 and touching >= 0.4 * objects and components < 0.85 * objects, (objects, touching, components)


def test_the_instances_suite_names_registered_instance_tasks():
    from autoseg.benchmark.suite import load_suite
    suite = load_suite(Path(__file__).parent.parent / "benchmarks" / "suites" / "instances.toml")
    assert {d.name for d in suite.datasets} == {"nuclei", "brain-mets", "lung-nodules"}
    assert all(TASKS[d.name].instance_classes for d in suite.datasets)


def test_a_scanner_setting_images_the_same_anatomy_differently():
    from autoseg.synth.scanner import parse_scanner

    base = draw_case("mri-nested", "tiny", index=1, seed=3)
    shifted = draw_case("mri-nested", "tiny", index=1, seed=3, scanner=parse_scanner("gamma=0.4,noise=0.03,blur=0.6"))
    assert np.array_equal(shifted.label, base.label) and shifted.geometry == base.geometry
    assert shifted.channels[0].dtype == base.channels[0].dtype
    z = [(c[0] - c[0].mean()) / c[0].std() for c in (base.channels, shifted.channels)]
    organ, lesion = base.label == 1, base.label == 2
    contrast = [float(x[lesion].mean() - x[organ].mean()) for x in z]  # per-image z-scoring does not undo it
    assert contrast[1] < 0.7 * contrast[0]
    coarse = draw_case("mri-nested", "tiny", index=1, seed=3, scanner=parse_scanner("spacing=2"))
    assert coarse.label.shape == tuple(round(s / 2) for s in base.label.shape)
    assert np.allclose(np.multiply(coarse.geometry.spacing, coarse.label.shape),
                       np.multiply(base.geometry.spacing, base.label.shape))
    assert set(np.unique(coarse.label)) <= set(np.unique(base.label))


def test_synth_scanner_is_recorded_and_a_bad_setting_is_one_line(tmp_path, capsys):
    out = tmp_path / "site"
    assert run(["-q", "synth", "png-2d", str(out), "--size", "tiny", "--cases", "2", "--scanner", "scale=0.5"]) == 0
    assert json.loads((out / "dataset.json").read_text())["autoseg_synth"]["scanner"] == {"scale": 0.5}
    assert validate_dataset(out) == []
    for bad in ("foo=1", "gamma=-1", "noise=x"):
        assert run(["synth", "png-2d", str(tmp_path / "bad"), "--scanner", bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
