"""Preprocessing: round trips back to the original image, the cache (idempotence, invalidation, atomicity),
normalization schemes and class locations. Plans are built by hand; the fingerprint holds what preprocessing
reads from it (source hashes, channel statistics)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from scipy import ndimage

import autoseg.preprocess as pp
from autoseg.artifacts import hash_files
from autoseg.dataset import load_dataset
from autoseg.errors import UserError
from autoseg.fingerprint import modality_of
from autoseg.io import Geometry, read_images, read_label, write_image
from autoseg.normalize import normalize, resolve
from autoseg.preprocess import preprocess, preprocess_case, restore_to_original
from autoseg.schema.fingerprint import CaseFingerprint, ChannelStats, Fingerprint
from autoseg.schema.plans import Configuration, Network, Normalization, Plans, Resampling
from autoseg.workdir import load_case

# --- helpers -----------------------------------------------------------------------------------------


def configuration(name="3d_fullres", spacing=(2.0, 1.0, 1.0), ndim=3, scheme="zscore", use_mask=False,
                  resampling=None, channels=1) -> Configuration:
    k = [3] * ndim
    return Configuration(
        name=name, ndim=ndim, spacing=list(spacing), median_shape=[8] * ndim, patch_size=[8] * ndim, batch_size=2,
        normalization=[Normalization(scheme, use_mask=use_mask) for _ in range(channels)],
        resampling=resampling or Resampling(),
        network=Network(family="unet", features=[8, 16], kernel_sizes=[k, k], strides=[[1] * ndim, [2] * ndim]))


def plans_of(*configs: Configuration, axis_order=()) -> Plans:
    return Plans(dataset_name="tiny", fingerprint_hash="", planner="hand", device={}, budget_s=0.0,
                 configurations={c.name: c for c in configs}, axis_order=list(axis_order))


def fingerprint_of(root: Path) -> Fingerprint:
    """What preprocessing reads from a fingerprint: each case's source hash and the channel statistics."""
    ds = load_dataset(root)
    cases = [CaseFingerprint(id=c.id, spacing=[], shape=[], cropped_shape=[], crop_box=[],
                             source_hash=hash_files([*c.images, c.label])) for c in ds.cases()]
    channels = [ChannelStats(name=n, modality=modality_of(n), mean=1.0, std=2.0, median=1.0, min=-4.0, max=6.0,
                             percentile_00_5=-3.0, percentile_99_5=5.0) for n in ds.channel_names]
    return Fingerprint(dataset_name=ds.name, dataset_hash="", ndim=0, channel_names=ds.channel_names,
                       labels=ds.labels, file_ending=ds.file_ending, cases=cases, channels=channels, classes=[],
                       median_spacing=[], median_shape=[], median_cropped_shape=[], anisotropy_ratio=1.0)


def run(root: Path, work: Path, plans: Plans, **kw) -> dict[str, int]:
    return preprocess(root, work, plans, fingerprint_of(root), jobs=kw.pop("jobs", 1), **kw)


def zero_border(root: Path, width: int = 2) -> None:
    """Zero a border of every image, so cropping to the nonzero region has something to remove."""
    for path in sorted((root / "imagesTr").iterdir()):
        image, geometry = read_images([path])
        inner = image[0].copy()
        cropped = np.zeros_like(inner)
        cropped[tuple(slice(width, s - width) for s in inner.shape)] = inner[tuple(slice(width, s - width)
                                                                                  for s in inner.shape)]
        write_image(cropped, geometry, path)


def original(root: Path, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    images, _ = read_images(sorted((root / "imagesTr").glob(f"{case_id}_*")))
    label, _ = read_label(next((root / "labelsTr").glob(f"{case_id}.*")))
    return images, label


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    return 2 * np.sum((a == value) & (b == value)) / (np.sum(a == value) + np.sum(b == value))


def leftovers(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# --- round trips -------------------------------------------------------------------------------------


def test_round_trip_at_identity_spacing_restores_labels_exactly_and_images_exactly(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(12, 16, 16))
    zero_border(root)
    cfg = configuration(spacing=(2.0, 1.0, 1.0), scheme="none")
    assert run(root, tmp_path / "w", plans_of(cfg)) == {"3d_fullres": 3}
    data, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case000")
    assert props["crop_box"] == [[2, 10], [2, 14], [2, 14]] and data.shape == (1, 8, 12, 12)
    images, label = original(root, "case000")
    assert np.array_equal(restore_to_original(np.asarray(seg), props, cfg, is_label=True), label)
    np.testing.assert_array_equal(restore_to_original(np.asarray(data), props, cfg, is_label=False), images)


def test_round_trip_at_a_changed_spacing_keeps_labels_close(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(12, 20, 20))
    cfg = configuration(spacing=(1.3, 0.7, 0.7))
    run(root, tmp_path / "w", plans_of(cfg))
    _, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case001")
    assert props["shape_after_resampling"] == [18, 29, 29]
    _, label = original(root, "case001")
    restored = restore_to_original(np.asarray(seg), props, cfg, is_label=True)
    assert restored.shape == label.shape and dice(restored, label, 1) > 0.95 and dice(restored, label, 2) > 0.7


def test_images_resampled_there_and_back_stay_within_interpolation_tolerance():
    x = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(16, 24, 24)), 2.5).astype(np.float32) + 5
    cfg = configuration(spacing=(0.7, 0.8, 0.8), scheme="none")
    data, _, props = preprocess_case(x[None], Geometry((1.0, 1.0, 1.0), (0.0,) * 3, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)),
                                     cfg, plans_of(cfg))
    back = restore_to_original(data, props, cfg, is_label=False, fill=0.0)[0]
    inner = (slice(2, -2),) * 3
    assert np.abs(back - x)[inner].max() < 0.05 * np.ptp(x)


def test_probabilities_restore_with_background_outside_the_crop():
    x = np.zeros((1, 8, 10, 10), np.float32)
    x[0, 2:6, 3:7, 3:7] = 1.0
    cfg = configuration(spacing=(1.0, 1.0, 1.0), scheme="none")
    data, _, props = preprocess_case(x, Geometry.identity(3), cfg, plans_of(cfg))
    probabilities = np.stack([np.full(data.shape[1:], 0.25, np.float32), np.full(data.shape[1:], 0.75, np.float32)])
    back = restore_to_original(probabilities, props, cfg, is_label=False)
    assert back.shape == (2, 8, 10, 10)
    assert back[0, 0, 0, 0] == 1.0 and back[1, 0, 0, 0] == 0.0 and back[1, 3, 4, 4] == 0.75


def test_separate_z_path_gives_the_planned_shapes(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(6, 16, 16), spacing=(4.0, 1.0, 1.0))
    resampling = Resampling(image_order=3, separate_z=True, z_axis=0, z_order=0)
    cfg = configuration(spacing=(2.0, 0.8, 0.8), resampling=resampling)
    run(root, tmp_path / "w", plans_of(cfg))
    data, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case000")
    assert data.shape == (1, 12, 20, 20) and seg.shape == (12, 20, 20) and props["spacing"] == [2.0, 0.8, 0.8]
    assert np.array_equal(seg[0::2], seg[1::2]) and np.array_equal(data[:, 0::2], data[:, 1::2])  # z: nearest
    _, label = original(root, "case000")
    assert dice(restore_to_original(np.asarray(seg), props, cfg, is_label=True), label, 1) > 0.95


def test_axis_order_is_applied_first_and_undone_last(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(10, 12, 14), spacing=(1.0, 1.0, 3.0))
    cfg = configuration(spacing=(3.0, 1.0, 1.0), scheme="none")
    run(root, tmp_path / "w", plans_of(cfg, axis_order=[2, 0, 1]))
    data, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case002")
    images, label = original(root, "case002")
    assert data.shape == (1, 14, 10, 12) and props["spacing_before_resampling"] == [3.0, 1.0, 1.0]
    assert np.array_equal(np.asarray(seg), label.transpose(2, 0, 1))
    assert np.array_equal(restore_to_original(np.asarray(seg), props, cfg, is_label=True), label)
    np.testing.assert_array_equal(restore_to_original(np.asarray(data), props, cfg, is_label=False), images)


def test_2d_png_dataset_is_stored_with_a_leading_axis_of_one(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(32, 32), ending=".png", channels=("gray",))
    cfg = configuration(name="2d", ndim=2, spacing=(0.5, 1.0), scheme="rescale")
    run(root, tmp_path / "w", plans_of(cfg))
    data, seg, props = load_case(tmp_path / "w" / "preprocessed" / "2d", "case000")
    assert data.ndim == 4 and data.shape[:2] == (1, 1) and seg.shape == data.shape[1:]
    assert data.shape[2] == 2 * props["shape_after_crop"][1] and data.max() <= 1.0
    _, label = original(root, "case000")
    restored = restore_to_original(np.asarray(seg), props, cfg, is_label=True)
    assert restored.shape == (32, 32) and dice(restored, label, 1) > 0.95


def test_2d_configuration_on_3d_data_leaves_the_slice_axis_untouched(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(7, 16, 16), spacing=(3.0, 1.0, 1.0))
    cfg = configuration(name="2d", ndim=2, spacing=(0.5, 0.5))
    run(root, tmp_path / "w", plans_of(cfg))
    data, _, props = load_case(tmp_path / "w" / "preprocessed" / "2d", "case000")
    assert data.shape == (1, 7, 32, 32) and props["spacing"] == [3.0, 0.5, 0.5]


def test_a_3d_configuration_on_2d_images_is_refused():
    with pytest.raises(UserError, match="3D but the images are 2D"):
        preprocess_case(np.ones((1, 8, 8), np.float32), Geometry.identity(2), configuration(), plans_of(configuration()))


# --- the cache ---------------------------------------------------------------------------------------


def test_second_run_recomputes_nothing(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration())
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 3}
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 0}


def test_a_changed_case_file_recomputes_exactly_that_case(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration())
    run(root, tmp_path / "w", plans)
    folder = tmp_path / "w" / "preprocessed" / "3d_fullres"
    before = {c: (folder / f"{c}.json").stat().st_mtime_ns for c in ("case000", "case002")}
    path = root / "imagesTr" / "case001_0000.nii.gz"
    image, geometry = read_images([path])
    write_image(image[0] * 2 + 1, geometry, path)
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 1}
    assert {c: (folder / f"{c}.json").stat().st_mtime_ns for c in before} == before


def test_a_changed_spacing_recomputes_that_configuration_only(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    a, b = configuration("3d_fullres"), configuration("3d_lowres", spacing=(3.0, 2.0, 2.0))
    run(root, tmp_path / "w", plans_of(a, b))
    b.spacing = [4.0, 2.0, 2.0]
    assert run(root, tmp_path / "w", plans_of(a, b)) == {"3d_fullres": 0, "3d_lowres": 3}
    assert run(root, tmp_path / "w", plans_of(a, b), configurations=["3d_lowres"]) == {"3d_lowres": 0}


def test_cases_gone_from_the_dataset_leave_the_cache(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration())
    run(root, tmp_path / "w", plans)
    (root / "imagesTr" / "case002_0000.nii.gz").unlink()
    (root / "labelsTr" / "case002.nii.gz").unlink()
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 0}
    names = sorted(p.name for p in (tmp_path / "w" / "preprocessed" / "3d_fullres").iterdir())
    assert names == [f"case00{i}{s}" for i in (0, 1) for s in (".json", ".npy", "_seg.npy")]


def test_a_crash_before_the_json_is_recomputed_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration())
    written = []

    def crash_on_second(record, path):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(path)
        real_write(record, path)

    real_write = pp.write_properties
    monkeypatch.setattr(pp, "write_properties", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(root, tmp_path / "w", plans)
    folder = tmp_path / "w" / "preprocessed" / "3d_fullres"
    assert (folder / "case001.npy").is_file() and not (folder / "case001.json").exists()
    assert leftovers(tmp_path / "w") == []
    monkeypatch.setattr(pp, "write_properties", real_write)
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 2}
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 0}


def test_a_crash_inside_an_array_write_leaves_nothing_behind(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "ds", cases=1)

    def torn_save(f, array, **kw):
        f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", torn_save)
    with pytest.raises(OSError):
        run(root, tmp_path / "w", plans_of(configuration()))
    assert list((tmp_path / "w" / "preprocessed" / "3d_fullres").iterdir()) == []


def test_a_deleted_array_is_recomputed(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration())
    run(root, tmp_path / "w", plans)
    (tmp_path / "w" / "preprocessed" / "3d_fullres" / "case000.npy").unlink()
    assert run(root, tmp_path / "w", plans) == {"3d_fullres": 1}


def test_jobs_sent_to_workers_pickle_and_split_the_cpus_between_workers(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "ds")
    threads = []
    monkeypatch.setattr(pp, "map_cases", lambda fn, items, *a, **k: [fn(pickle.loads(pickle.dumps(x))) for x in items])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(pp.os, "cpu_count", lambda: 4)
    assert run(root, tmp_path / "w", plans_of(configuration()), jobs=2) == {"3d_fullres": 3}
    assert threads == [2, 2, 2]


@pytest.mark.slow  # starts real worker processes, each importing torch: seconds on a busy 2-core machine
def test_worker_processes_give_the_same_cache(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds")
    plans = plans_of(configuration(spacing=(1.5, 0.8, 0.8)))
    run(root, tmp_path / "serial", plans, jobs=1)
    assert run(root, tmp_path / "pool", plans, jobs=2) == {"3d_fullres": 3}
    for case in ("case000", "case001", "case002"):
        a = load_case(tmp_path / "serial" / "preprocessed" / "3d_fullres", case)
        b = load_case(tmp_path / "pool" / "preprocessed" / "3d_fullres", case)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --- normalization, masks, class locations -----------------------------------------------------------


def test_normalization_schemes_match_hand_computed_values():
    x = np.array([[[[0.0, 2.0], [4.0, 10.0]]]], np.float32)  # (C=1, 1, 2, 2)
    ct = normalize(x, [Normalization("ct", clip_low=1.0, clip_high=5.0, mean=3.0, std=2.0)])
    np.testing.assert_allclose(ct.ravel(), [-1.0, -0.5, 0.5, 1.0])
    np.testing.assert_allclose(normalize(x, [Normalization("zscore")]).ravel(), (x.ravel() - 4.0) / np.sqrt(14.0),
                               rtol=1e-6)
    mask = np.array([[[False, True], [True, True]]])
    np.testing.assert_allclose(normalize(x, [Normalization("zscore", use_mask=True)], mask).ravel(),
                               [0.0, *((np.array([2.0, 4.0, 10.0]) - 16 / 3) / np.std([2.0, 4.0, 10.0]))], rtol=1e-6)
    np.testing.assert_allclose(normalize(x * 25.5, [Normalization("rescale")]).ravel(), [0.0, 0.2, 0.4, 1.0], rtol=1e-6)
    assert np.array_equal(normalize(x, [Normalization("none")]), x)
    assert np.all(normalize(np.full((1, 2, 2, 2), 7.0, np.float32), [Normalization("zscore")]) == 0)


def test_ct_normalization_takes_missing_values_from_the_fingerprint():
    stats = [ChannelStats("CT", "CT", mean=40.0, std=10.0, median=40.0, min=-1000.0, max=2000.0,
                          percentile_00_5=-100.0, percentile_99_5=300.0)]
    (filled,) = resolve([Normalization("ct", clip_high=200.0)], stats)
    assert (filled.clip_low, filled.clip_high, filled.mean, filled.std) == (-100.0, 200.0, 40.0, 10.0)
    with pytest.raises(UserError, match="needs clip_low"):
        normalize(np.zeros((1, 2, 2, 2), np.float32), [Normalization("ct")])
    with pytest.raises(UserError, match="unknown normalization scheme 'minmax'"):
        normalize(np.zeros((1, 2, 2, 2), np.float32), [Normalization("minmax")])


def test_masked_normalization_marks_background_outside_the_mask_with_minus_one(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(12, 16, 16))
    for path in sorted((root / "imagesTr").iterdir()):  # a ball of signal in a zero background
        image, geometry = read_images([path])
        grid = np.meshgrid(*[np.arange(s) - s / 2 for s in image.shape[1:]], indexing="ij")
        ball = sum(g ** 2 for g in grid) < 36
        write_image(np.where(ball, image[0] + 10, 0), geometry, path)
    cfg = configuration(spacing=(2.0, 1.0, 1.0), use_mask=True)
    run(root, tmp_path / "w", plans_of(cfg))
    data, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case000")
    assert props["masked"] and seg.min() == -1 and seg.dtype == np.int8
    inside = np.asarray(seg) >= 0
    assert np.all(np.asarray(data)[0][~inside] == 0)
    assert abs(float(np.asarray(data)[0][inside].mean())) < 1e-5


def test_class_locations_point_at_voxels_of_their_class(tmp_path):
    root = write_tiny_dataset(tmp_path / "ds", shape=(12, 20, 20))
    run(root, tmp_path / "w", plans_of(configuration(spacing=(1.5, 0.9, 0.9))))
    _, seg, props = load_case(tmp_path / "w" / "preprocessed" / "3d_fullres", "case000")
    locations = props["class_locations"]
    assert sorted(locations) == ["1", "2"]
    for value, coords in locations.items():
        points = np.array(coords)
        assert 0 < len(points) <= pp.MAX_CLASS_LOCATIONS and len({tuple(p) for p in coords}) == len(coords)
        assert np.all(np.asarray(seg)[tuple(points.T)] == int(value))
    assert len(locations["2"]) == int(np.sum(np.asarray(seg) == 2))  # fewer voxels than the limit: all of them


def test_class_locations_are_bounded_seeded_and_skip_the_ignore_label():
    seg = np.zeros((10, 40, 40), np.int8)
    seg[:, 5:35, 5:35] = 1
    seg[0, 0, 0] = 3
    a = pp.class_locations(seg, seed=7, ignore_label=3, limit=100)
    assert list(a) == ["1"] and len(a["1"]) == 100 and a == pp.class_locations(seg, seed=7, ignore_label=3, limit=100)
