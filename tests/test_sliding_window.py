"""Sliding window: Gaussian-weighted tile probabilities normalised per voxel (separably), accumulated into a
caller's buffer (folds add into one), float16 storage within its rounding, padding of small volumes, 2D."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.sliding_window import count_tiles, gaussian_weights, sliding_window, tile_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def net(ndim: int, seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv3d if ndim == 3 else nn.Conv2d
    return nn.Sequential(conv(1, 4, 3, padding=1), nn.LeakyReLU(), conv(4, classes, 3, padding=1)).eval()


def reference(model: nn.Module, data: np.ndarray, patch: list[int], classes: int, ndim: int,
              mirror_axes=()) -> torch.Tensor:
    """The textbook version: pad, Gaussian-weight every tile's softmax into a volume, divide by the weight volume."""
    full = [1, *patch] if ndim == 2 else patch
    x = torch.from_numpy(data)
    pads = [max(p - n, 0) for n, p in zip(x.shape[1:], full)]
    lo = [p // 2 for p in pads]
    x = nn.functional.pad(x, [v for a, p in zip(reversed(lo), reversed(pads)) for v in (a, p - a)])
    shape = x.shape[1:]
    acc, norm = torch.zeros(classes, *shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    w = gaussian_weights(tuple(full)).double()
    starts = [tile_starts(s, p, 0.5 if ndim == 3 or i else 0.0) for i, (s, p) in enumerate(zip(shape, full))]
    flips = [list(c) for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    with torch.no_grad():
        for st in itertools.product(*starts):
            sl = tuple(slice(s, s + p) for s, p in zip(st, full))
            tile = x[(slice(None), *sl)][None]
            tile = tile[:, :, 0] if ndim == 2 else tile
            p = sum(torch.softmax(model(tile.flip([a + 2 for a in f])), 1).flip([a + 2 for a in f]) for f in flips)
            p = (p[0] / len(flips)).double()
            acc[(slice(None), *sl)] += (p[:, None] if ndim == 2 else p) * w
            norm[sl] += w
    crop = tuple(slice(a, a + n) for a, n in zip(lo, data.shape[1:]))
    return (acc / norm)[(slice(None), *crop)].float()


@pytest.mark.parametrize("ndim, shape, patch, mirror", [
    (3, (11, 20, 17), [8, 8, 8], ()),        # several tiles per axis, uneven
    (3, (5, 20, 6), [8, 8, 8], (1, 2)),      # padded on two axes, mirrored
    (2, (3, 19, 13), [8, 8], (0,)),          # 2D network over slices
])
def test_matches_the_textbook_weighted_average_of_tile_probabilities(ndim, shape, patch, mirror):
    data = np.random.default_rng(0).normal(0, 1, (1, *shape)).astype(np.float32)
    model = net(ndim, 0)
    got = sliding_window(model, data, patch, 3, ndim, mirror_axes=mirror, tile_batch=3)
    torch.testing.assert_close(got, reference(model, data, patch, 3, ndim, mirror), atol=2e-6, rtol=0)
    torch.testing.assert_close(got.sum(0), torch.ones(shape), atol=2e-6, rtol=0)


def test_folds_add_into_one_buffer_as_the_mean_of_their_probabilities():
    data = np.random.default_rng(1).normal(0, 1, (1, 9, 18, 18)).astype(np.float32)
    models = [net(3, s) for s in (1, 2)]
    singles = [sliding_window(m, data, [8, 8, 8], 3, 3) for m in models]
    buf = torch.zeros(3, 9, 18, 18)
    for m in models:
        assert sliding_window(m, data, [8, 8, 8], 3, 3, out=buf, scale=0.5) is buf
    torch.testing.assert_close(buf, (singles[0] + singles[1]) / 2, atol=1e-6, rtol=0)


def test_float16_buffer_stays_within_a_few_float16_steps_of_float32():
    data = np.random.default_rng(2).normal(0, 1, (1, 12, 24, 24)).astype(np.float32)
    models = [net(3, s) for s in (3, 4, 5)]
    exact, half = torch.zeros(3, 12, 24, 24), torch.zeros(3, 12, 24, 24, dtype=torch.float16)
    for m in models:
        sliding_window(m, data, [8, 8, 8], 3, 3, out=exact, scale=1 / 3)
        sliding_window(m, data, [8, 8, 8], 3, 3, out=half, scale=1 / 3)
    adds = 8 * len(models)  # tiles over a voxel (2 per axis at 50% overlap) x folds: one rounding each
    assert (half.float() - exact).abs().max() <= adds * 2.0 ** -12


def test_a_buffer_of_the_wrong_shape_is_refused_and_tiles_are_counted():
    data = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="expected"):
        sliding_window(net(3, 0), data, [4, 8, 8], 3, 3, out=torch.zeros(2, 4, 8, 8))
    assert count_tiles((20, 20, 20), [8, 8, 8], 3) == 4 ** 3 and count_tiles((5, 20, 20), [8, 8], 2) == 5 * 16
