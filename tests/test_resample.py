"""Resampling: agreement with scipy.ndimage (the reference), labels, probabilities, the separate-z path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from autoseg.resample import (
    axis_orders,
    present_values,
    resample_image,
    resample_label,
    resample_probabilities,
    resize,
    target_shape,
)
from autoseg.schema.plans import Resampling


def smooth(shape, seed=0) -> np.ndarray:
    return ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5).astype(np.float32)


def scipy_zoom(x: np.ndarray, shape, order: int) -> np.ndarray:
    return ndimage.zoom(x, [n / o for n, o in zip(shape, x.shape)], order=order, mode="nearest", grid_mode=True)


def spheres(shape) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    r = sum((g / s) ** 2 for g, s in zip(grid, shape)) ** 0.5
    return ((r < 0.4).astype(np.int8) + (r < 0.2) + (r < 0.1)).astype(np.int8)


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("new", [(13, 21, 17), (7, 9, 30)])
def test_resize_equals_scipy_zoom_for_each_order(order, new):
    x = smooth((10, 16, 20))
    np.testing.assert_allclose(resize(x[None], new, (order,) * 3)[0], scipy_zoom(x, new, order), atol=2e-5)


def test_mixed_orders_equal_scipy_applied_axis_by_axis():
    x = smooth((6, 16, 16))
    new = (15, 20, 12)
    expected = scipy_zoom(scipy_zoom(x, (6, 20, 12), 3), new, 0)
    np.testing.assert_allclose(resize(x[None], new, (0, 3, 3))[0], expected, atol=2e-5)


def test_unchanged_shape_returns_the_values_unchanged():
    x = smooth((5, 6, 7))[None]
    assert np.array_equal(resample_image(x, (5, 6, 7), Resampling()), x)
    seg = spheres((5, 6, 7))
    assert np.array_equal(resample_label(seg, (5, 6, 7), Resampling()), seg)


def test_order3_images_are_clipped_to_the_input_range():
    x = np.zeros((1, 8, 8, 8), np.float32)
    x[0, :, :, 4:] = 1.0  # a step: a cubic spline overshoots it
    out = resample_image(x, (8, 13, 13), Resampling(image_order=3))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert scipy_zoom(x[0], (8, 13, 13), 3).max() > 1.0


def test_labels_keep_only_their_values_and_agree_with_scipy_per_label_argmax():
    seg = spheres((12, 20, 20))
    new = (17, 27, 23)
    out = resample_label(seg, new, Resampling(label_order=1))
    assert out.dtype == seg.dtype and out.shape == new
    assert set(np.unique(out)) <= set(np.unique(seg))
    scores = np.stack([scipy_zoom((seg == v).astype(np.float32), new, 1) for v in range(4)])
    assert np.mean(out == np.argmax(scores, axis=0)) > 0.999


def test_negative_labels_are_resampled_like_any_other():
    seg = spheres((8, 12, 12))
    seg[:, :2] = -1
    out = resample_label(seg, (8, 18, 18), Resampling())
    assert present_values(out) == [-1, 0, 1, 2, 3]
    assert (out[:, :3] == -1).all()


def test_nearest_label_order_copies_labels():
    seg = spheres((8, 12, 12))
    out = resample_label(seg, (16, 24, 24), Resampling(label_order=0))
    assert np.array_equal(out[::2, ::2, ::2], seg)


def test_probabilities_stay_a_distribution():
    seg = spheres((8, 12, 12))
    onehot = np.stack([(seg == v) for v in range(4)]).astype(np.float32)
    out = resample_probabilities(onehot, (11, 17, 9), Resampling())
    assert out.shape == (4, 11, 17, 9)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    assert out.min() >= 0.0


def test_separate_z_uses_the_z_order_on_the_out_of_plane_axis_only():
    resampling = Resampling(image_order=3, separate_z=True, z_axis=0, z_order=0)
    assert axis_orders(3, resampling) == (0, 3, 3)
    assert axis_orders(1, Resampling(separate_z=True, z_axis=2, z_order=0)) == (1, 1, 0)
    x = smooth((4, 16, 16))[None]
    out = resample_image(x, (8, 16, 16), resampling)  # z doubled, in-plane unchanged
    for z in range(8):  # nearest along z: every new slice is an old slice, untouched in-plane
        assert np.array_equal(out[0, z], x[0, z // 2])


def test_target_shape_keeps_the_physical_extent():
    assert target_shape((10, 20, 30), (2.0, 1.0, 0.5), (1.0, 1.0, 1.0)) == [20, 20, 15]
    assert target_shape((1, 5, 5), (1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == [1, 5, 5]
