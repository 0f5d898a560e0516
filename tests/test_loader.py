"""Loader and augmentation: batch shapes (3D, 2D from the 3D cache, padding), batches as a pure function of
(seed, step), background workers giving the same batches in order, class-aware foreground oversampling,
and augmentation that keeps labels aligned with the image. Caches are tiny and written by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from autoseg.augment import build_transforms, region_size, scaled
from autoseg.loader import BatchMaker, PatchLoader, default_workers, lower_bounds, measure_loader
from autoseg.preprocess import class_locations, write_case
from autoseg.schema.plans import Augmentation, Configuration, Network, Normalization, Resampling, Sampling

NO_INTENSITY = dict(noise=0.0, blur=0.0, brightness=0.0, contrast=0.0, gamma=0.0, low_resolution=0.0)

# --- helpers -----------------------------------------------------------------------------------------


def configuration(ndim: int = 3, patch=(8, 16, 16), batch_size: int = 2, augmentation: Augmentation | None = None,
                  sampling: Sampling | None = None, use_mask: bool = False, channels: int = 1) -> Configuration:
    k = [3] * ndim
    return Configuration(
        name=f"{ndim}d", ndim=ndim, spacing=[1.0] * ndim, median_shape=list(patch), patch_size=list(patch),
        batch_size=batch_size, normalization=[Normalization(use_mask=use_mask) for _ in range(channels)],
        resampling=Resampling(),
        network=Network(features=[4, 8], kernel_sizes=[k, k], strides=[[1] * ndim, [2] * ndim]),
        augmentation=augmentation or Augmentation(), sampling=sampling or Sampling())


def write_cache(folder: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], ignore_label=None) -> list[str]:
    """Cases (data (C, Z, Y, X), seg (Z, Y, X)) written as preprocess writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for case_id, (data, seg) in cases.items():
        record = {"case": case_id, "shape_after_resampling": list(seg.shape),
                  "class_locations": class_locations(seg, 0, ignore_label)}
        write_case(folder, case_id, data, seg, record)
    return list(cases)


def boxes_case(shape=(20, 24, 24), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with two labelled boxes."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int8)
    seg[4:12, 5:15, 6:16] = 1
    seg[6:9, 8:11, 9:12] = 2
    data = (rng.normal(0, 1, shape) + 2 * seg).astype(np.float32)[None]
    return data, seg


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "preprocessed" / "3d_fullres"
    return folder, write_cache(folder, {f"c{i}": boxes_case(seed=i) for i in range(3)})


# --- shapes --------------------------------------------------------------------------------------------


def test_3d_batches_have_the_patch_shape(cache):
    folder, ids = cache
    batch = BatchMaker(folder, ids, configuration(batch_size=3), seed=0).make(0)
    assert batch["data"].shape == (3, 1, 8, 16, 16) and batch["data"].dtype == np.float32
    assert batch["target"].shape == (3, 8, 16, 16) and batch["target"].dtype == np.int16
    assert set(np.unique(batch["target"])) <= {0, 1, 2}


def test_2d_patches_are_slices_of_the_3d_cache(tmp_path):
    data = np.broadcast_to(np.arange(1, 21, dtype=np.float32)[:, None, None], (20, 24, 24))[None].copy()
    seg = np.zeros((20, 24, 24), np.int8)
    seg[5:8, 4:12, 4:12] = 1
    ids = write_cache(tmp_path / "2d", {"a": (data, seg)})
    config = configuration(ndim=2, patch=(16, 16), batch_size=6, augmentation=Augmentation(mirror_axes=[0, 1]))
    batch = BatchMaker(tmp_path / "2d", ids, config, seed=3, augment=False).make(0)
    assert batch["data"].shape == (6, 1, 16, 16) and batch["target"].shape == (6, 16, 16)
    for patch in batch["data"][:, 0]:
        assert len(np.unique(patch)) == 1  # every pixel from one slice (the value encodes the slice)
    augmented = BatchMaker(tmp_path / "2d", ids, config, seed=3).make(0)
    assert augmented["data"].shape == (6, 1, 16, 16)


def test_images_smaller_than_the_patch_are_padded(tmp_path):
    data, seg = np.ones((1, 4, 6, 6), np.float32), np.ones((4, 6, 6), np.int8)
    ids = write_cache(tmp_path / "small", {"s": (data, seg)})
    for augment in (False, True):
        batch = BatchMaker(tmp_path / "small", ids, configuration(), seed=0, augment=augment).make(1)
        assert batch["data"].shape == (2, 1, 8, 16, 16)
        assert set(np.unique(batch["target"])) <= {0, 1}  # padding (-1) became background
    plain = BatchMaker(tmp_path / "small", ids, configuration(), seed=0, augment=False).make(1)
    assert (plain["data"] != 0).sum(axis=(1, 2, 3, 4)).tolist() == [144, 144]  # the whole image, once
    assert (plain["target"] == 1).sum() == 2 * 144
    assert plain["data"][:, 0, 2:6, 5:11, 5:11].min() == 1  # centred


def test_lower_bounds_let_the_patch_reach_every_border():
    low, high = lower_bounds([100], [90], [64])
    assert (low[0] + 13, high[0] + 13 + 64) == (0, 100)  # centre crop offset (90 - 64) / 2


# --- determinism ---------------------------------------------------------------------------------------


def test_make_is_a_pure_function_of_seed_and_step(cache):
    folder, ids = cache
    maker = BatchMaker(folder, ids, configuration(), seed=7)
    first, again = maker.make(5), BatchMaker(folder, ids, configuration(), seed=7).make(5)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["data"], maker.make(6)["data"])
    assert not np.array_equal(first["data"], BatchMaker(folder, ids, configuration(), seed=8).make(5)["data"])


def test_make_leaves_the_callers_random_state_alone(cache):
    folder, ids = cache
    np.random.seed(1)
    expected = np.random.random()
    np.random.seed(1)
    BatchMaker(folder, ids, configuration(), seed=0).make(0)
    assert np.random.random() == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_patch_loader_yields_make_in_order_from_start_step(cache, workers):
    folder, ids = cache
    maker = BatchMaker(folder, ids, configuration(), seed=0)
    with PatchLoader(maker, start_step=4, num_workers=workers, prefetch=2) as loader:
        for step in range(4, 8):
            batch = next(loader)
            assert isinstance(batch["data"], torch.Tensor)
            expected = maker.make(step)
            assert np.array_equal(batch["data"].numpy(), expected["data"])
            assert np.array_equal(batch["target"].numpy(), expected["target"])
        assert loader.step == 8


def test_default_workers_leaves_a_cpu_for_training():
    assert 1 <= default_workers() <= 8


def test_measure_loader_returns_seconds_per_batch(cache):
    folder, ids = cache
    assert 0 < measure_loader(BatchMaker(folder, ids, configuration(), seed=0), steps=2) < 10


# --- foreground oversampling ---------------------------------------------------------------------------


def sparse_case(shape=(24, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Little foreground far apart: a common class 1 and a rare class 2 (one small blob each)."""
    seg = np.zeros(shape, np.int8)
    seg[2:8, 2:14, 2:14] = 1
    seg[18:20, 58:60, 58:60] = 2
    return np.random.default_rng(0).normal(0, 1, (1, *shape)).astype(np.float32), seg


def test_foreground_fraction_one_puts_foreground_in_every_patch(tmp_path):
    ids = write_cache(tmp_path / "sparse", {"a": sparse_case()})
    config = configuration(patch=(8, 16, 16), batch_size=4, sampling=Sampling(foreground_fraction=1.0))
    maker = BatchMaker(tmp_path / "sparse", ids, config, seed=0, augment=False)
    for step in range(10):
        assert all((t > 0).any() for t in maker.make(step)["target"])
    random_only = BatchMaker(tmp_path / "sparse", ids, replace(config, sampling=Sampling(0.0)), seed=0,
                             augment=False)
    hits = [(t > 0).any() for step in range(10) for t in random_only.make(step)["target"]]
    assert np.mean(hits) < 0.9


def test_a_rare_class_with_a_high_weight_is_hit_more_often(tmp_path):
    ids = write_cache(tmp_path / "sparse", {"a": sparse_case()})

    def share_with_class_2(weights: dict[str, float]) -> float:
        config = configuration(batch_size=4, sampling=Sampling(1.0, weights))
        maker = BatchMaker(tmp_path / "sparse", ids, config, seed=0, augment=False)
        return float(np.mean([(t == 2).any() for step in range(20) for t in maker.make(step)["target"]]))

    equal, favoured, never = share_with_class_2({}), share_with_class_2({"1": 1, "2": 9}), share_with_class_2(
        {"1": 1, "2": 0})
    assert never == 0 and 0.3 < equal < 0.7 and favoured > 0.8


def test_forced_samples_are_the_last_of_the_batch_and_at_least_one(cache):
    from autoseg.loader import forced_foreground

    rng = np.random.default_rng(0)
    assert forced_foreground(2, 0.33, rng).tolist() == [False, True]
    assert forced_foreground(8, 0.05, rng).tolist() == [False] * 7 + [True]
    assert not forced_foreground(4, 0.0, rng).any()
    assert 0.2 < np.mean([forced_foreground(1, 0.33, rng)[0] for _ in range(400)]) < 0.45


# --- augmentation ----------------------------------------------------------------------------------------


def blobs(shape, seed: int = 0) -> np.ndarray:
    """A label map of large smooth regions with values 0..3."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), 4)
    return np.digitize(field, np.quantile(field, [0.4, 0.6, 0.8])).astype(np.int32)


def alignment(data: np.ndarray, seg: np.ndarray, const: float) -> float:
    """Share of voxels away from label boundaries where round(image / const) is the label."""
    agree = np.rint(data / const) == seg
    interior = np.ones_like(agree)
    for b in range(seg.shape[0]):
        s = seg[b, 0]
        interior[b, 0] = ndimage.maximum_filter(s, 3) == ndimage.minimum_filter(s, 3)
    return float(agree[interior].mean())


@pytest.mark.parametrize("ndim,patch,dummy_2d", [(3, (16, 24, 24), False), (3, (8, 24, 24), True),
                                                  (2, (32, 32), False)])
def test_augmentation_keeps_image_and_label_aligned(ndim, patch, dummy_2d):
    aug = Augmentation(rotation_deg=45.0 if ndim == 3 else 180.0, scale=[0.7, 1.4], elastic=True,
                       mirror_axes=list(range(ndim)), dummy_2d=dummy_2d, **NO_INTENSITY)
    region = region_size(patch, aug, ndim)
    seg = np.stack([blobs(region, seed=i)[None] for i in range(4)])
    const = 10.0
    np.random.seed(0)
    out = build_transforms(aug, patch, ndim, p_spatial=1.0)(data=seg * const, seg=seg.copy())
    assert out["data"].shape == (4, 1, *patch) and out["seg"].shape == (4, 1, *patch)
    assert alignment(out["data"], out["seg"], const) > 0.98
    centre = tuple(slice((r - p) // 2, (r - p) // 2 + p) for r, p in zip(region, patch))
    assert not np.array_equal(out["seg"], seg[(slice(None), slice(None), *centre)])  # it did transform


def test_ignore_label_passes_through_augmentation(tmp_path):
    data, seg = boxes_case()
    seg[12:18, 2:20, 2:20] = 5  # the ignore label, a value the interpolation must keep exact
    ids = write_cache(tmp_path / "ign", {"a": (data, seg)}, ignore_label=5)
    aug = Augmentation(rotation_deg=45.0, mirror_axes=[0, 1, 2])
    maker = BatchMaker(tmp_path / "ign", ids, configuration(batch_size=4, augmentation=aug), seed=0, ignore_label=5)
    assert all(5 not in case.locations for case in maker.cases)  # never oversampled
    values = np.unique(np.concatenate([maker.make(s)["target"].ravel() for s in range(6)]))
    assert 5 in values and set(values) <= {0, 1, 2, 5}


def test_outside_the_mask_is_background_and_masked_channels_are_zero(tmp_path):
    data, seg = boxes_case()
    seg[:, :, :3] = -1  # outside the nonzero mask
    data[0][seg == -1] = 0
    ids = write_cache(tmp_path / "mask", {"a": (data, seg)})
    aug = Augmentation(rotation_deg=0.0, scale=[1.0, 1.0], noise=1.0, brightness=1.0)  # moves zeros
    config = configuration(patch=(8, 24, 24), batch_size=4, augmentation=aug, use_mask=True)
    for step in range(3):
        batch = BatchMaker(tmp_path / "mask", ids, config, seed=0).make(step)
        assert batch["target"].min() >= 0
        assert (batch["data"][:, 0, :, :, :3] == 0).all()  # the noise and brightness moved it, the mask put it back


def test_region_is_enlarged_only_for_spatial_augmentation():
    aug = Augmentation(rotation_deg=30.0, scale=[0.7, 1.4])
    r3 = region_size([64, 96, 96], aug, 3)
    assert all(r > p for r, p in zip(r3, [64, 96, 96]))
    assert region_size([8, 96, 96], replace(aug, dummy_2d=True), 3)[0] == 8
    assert region_size([64, 64], replace(aug, rotation_deg=45.0, scale=[1.0, 1.0]), 2) == [91, 91]  # 64 * sqrt 2
    assert region_size([64, 96, 96], scaled(aug, 0.0), 3) == [64, 96, 96]


def test_zero_probability_disables_a_transform():
    off = scaled(Augmentation(mirror_axes=[0, 1]), 0.0)
    names = [type(t).__name__ for t in build_transforms(off, [16, 16], 2).transforms]
    assert names == ["MirrorTransform", "OutsideToBackground"]
    full = [type(t).__name__ for t in build_transforms(Augmentation(), [16, 16], 2).transforms]
    assert "GaussianNoiseTransform" in full and "SpatialTransform" in full
