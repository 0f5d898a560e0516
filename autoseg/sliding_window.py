"""Sliding-window inference over a preprocessed case: Gaussian-weighted tiles, batched through the network.

Works on the cache's 3-axis layout ``(C, Z, Y, X)`` for both kinds of configuration: a 3D network sees
tiles of ``patch``; a 2D network sees tiles of ``(1, *patch)`` with the slice axis squeezed, so the same
tiling, batching and accumulation serve both.

What is accumulated are probabilities, not logits: each tile's softmax (the mean over its mirror flips) is
weighted by a Gaussian peaked at the tile centre and divided by the sum of the weights of all tiles over
each voxel, so a voxel holds a convex combination of tile probabilities as soon as its last tile is added.
That is what lets several folds (and calls) add into one caller-provided buffer, ``scale`` each, with no
second volume and no normalisation pass at the end (nnU-Net v1 aggregated softmax tiles the same way; v2
aggregates logits, which needs a float32 logit volume per fold).

The Gaussian is a product of one 1D Gaussian per axis and the tile origins are a grid, so the weight sum
is a product of one 1D sum per axis too: the normalisation is computed per axis in float32 (exact to a
float32 rounding step), never as a volume. The buffer may be float16: each addition then rounds once to
float16 (a step of 2**-11 at most for values in [0, 1]); see :func:`sliding_window`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from autoseg.device import AUTOCAST

ACTIVATIONS = ("softmax", "sigmoid")  # label maps; regions (one independent probability per output)
SIGMA_SCALE = 1 / 8  # the Gaussian's sigma as a fraction of the patch, per axis (nnU-Net's value)


@lru_cache(maxsize=32)
def gaussian_1d(n: int, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """One axis of the importance map, peaked (1.0) at the tile centre: border voxels, which see less
    context, count less. No value underflows (the border is ~4 sigma out: exp(-8))."""
    g = torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / max(n * sigma_scale, 1e-3)) ** 2)
    return (g / g.max()).float()


def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """The importance map of a whole tile: the outer product of :func:`gaussian_1d` per axis."""
    w = gaussian_1d(patch[0], sigma_scale)
    for n in patch[1:]:
        w = w[..., None] * gaussian_1d(n, sigma_scale)
    return w


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread tile origins covering ``size`` with at least ``overlap`` between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = int(np.ceil((size - patch) / step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def _full_patch(patch: Sequence[int], ndim: int) -> list[int]:
    return [1, *patch] if ndim == 2 else [int(p) for p in patch]


def _axis_starts(shape: Sequence[int], patch: Sequence[int], ndim: int, overlap: float) -> list[list[int]]:
    """Tile origins per axis of the (padded) 3-axis volume; a 2D network's slices do not overlap."""
    return [tile_starts(max(s, p), p, overlap if ndim == 3 or i > 0 else 0.0)
            for i, (s, p) in enumerate(zip(shape, _full_patch(patch, ndim)))]


def count_tiles(shape: Sequence[int], patch: Sequence[int], ndim: int, overlap: float = 0.5) -> int:
    return int(np.prod([len(s) for s in _axis_starts(shape, patch, ndim, overlap)]))


def _axis_factors(size: int, patch: int, starts: list[int], gaussian: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per tile origin on one axis: the Gaussian divided by the sum of the Gaussians of every tile over each
    voxel. The tile's weight at a voxel is the product of its axes' factors; over all tiles they sum to 1."""
    total = torch.zeros(max(size, patch), dtype=torch.float64)
    for s in starts:
        total[s:s + patch] += gaussian
    return {s: (gaussian.double() / total[s:s + patch]).float() for s in starts}


@torch.inference_mode()
def sliding_window(model: nn.Module, data: np.ndarray | torch.Tensor, patch: Sequence[int], num_classes: int,
                   ndim: int, device: str | torch.device = "cpu", overlap: float = 0.5,
                   mirror_axes: Sequence[int] = (), tile_batch: int = 4, precision: str = "fp32",
                   channels_last: bool = False, progress=None, out: torch.Tensor | None = None,
                   scale: float = 1.0, activation: str = "softmax", extra: int = 0) -> torch.Tensor:
    """Class probabilities ``(num_classes, Z, Y, X)`` (on CPU) of a preprocessed case ``(C, Z, Y, X)``;
    ``activation`` "sigmoid" gives each channel's own probability (region models) instead of the softmax.
    The last ``extra`` of the ``num_classes`` channels are outputs of their own (the interior of each object,
    :mod:`autoseg.instances`): each through a sigmoid, outside the classes' softmax.

    With ``out`` (a CPU tensor of that shape, float32 or float16), ``scale`` times the probabilities are
    added into it and it is returned: the folds of a model add ``1 / folds`` each into one buffer. Without
    it a float32 one is allocated. ``mirror_axes`` are network axes (0..ndim-1) for test-time mirroring:
    every combination of flips is averaged. ``tile_batch`` tiles go through the network at once.

    Memory: ``out`` and the tiles of one batch; ``data`` is read tile by tile (a memory map stays one).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    dev = torch.device(device)
    model.eval()
    shape = list(data.shape[1:])
    if out is None:
        out = torch.zeros((num_classes, *shape), dtype=torch.float32)
    elif list(out.shape) != [num_classes, *shape] or out.device.type != "cpu":
        raise ValueError(f"out has shape {list(out.shape)} on {out.device}, expected {[num_classes, *shape]} on cpu")
    full_patch = _full_patch(patch, ndim)
    padded = [max(s, p) for s, p in zip(shape, full_patch)]
    lo = [(p - s) // 2 for s, p in zip(shape, padded)]  # the data sits centred in the padded volume
    starts = _axis_starts(shape, patch, ndim, overlap)
    factors = [_axis_factors(n, p, st, gaussian_1d(p)) for n, p, st in zip(padded, full_patch, starts)]
    flips = [list(c) for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    amp = AUTOCAST.get(precision)
    fmt = (torch.channels_last_3d if ndim == 3 else torch.channels_last) if channels_last else torch.contiguous_format
    grid = list(itertools.product(*starts))
    for i in range(0, len(grid), tile_batch):
        group = grid[i:i + tile_batch]
        tiles = torch.from_numpy(np.stack([_read_tile(data, st, full_patch, lo) for st in group])).to(dev)
        if ndim == 2:
            tiles = tiles[:, :, 0]
        tiles = tiles.contiguous(memory_format=fmt)
        probs = None
        for f in flips:
            dims = [a + 2 for a in f]
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                y = model(torch.flip(tiles, dims) if dims else tiles)
            y = y[0] if isinstance(y, (list, tuple)) else y
            y = _activate(y.float(), activation, extra)
            y = torch.flip(y, dims) if dims else y
            probs = y if probs is None else probs.add_(y)
        probs = probs.cpu()
        if ndim == 2:
            probs = probs[:, :, None]
        for k, st in enumerate(group):
            w = factors[0][st[0]][:, None, None] * factors[1][st[1]][None, :, None] * factors[2][st[2]][None, None, :]
            tile = probs[k].mul_(w * (scale / len(flips)))
            src, dst = _overlap(st, full_patch, lo, shape)
            out[(slice(None), *dst)] += tile[(slice(None), *src)]
        if progress is not None:
            progress(len(group))
    return out


def _activate(y: torch.Tensor, activation: str, extra: int) -> torch.Tensor:
    classes = y[:, :y.shape[1] - extra]
    classes = torch.softmax(classes, 1) if activation == "softmax" else torch.sigmoid(classes)
    return torch.cat([classes, torch.sigmoid(y[:, y.shape[1] - extra:])], 1) if extra else classes


def _read_tile(data: np.ndarray | torch.Tensor, start: Sequence[int], patch: Sequence[int],
               lo: Sequence[int]) -> np.ndarray:
    """The tile at ``start`` of the zero-padded volume, as a float32 array (only the tile is read)."""
    src = tuple(slice(max(s - a, 0), min(s - a + p, n)) for s, p, a, n in zip(start, patch, lo, data.shape[1:]))
    block = np.asarray(data[(slice(None), *src)], dtype=np.float32)
    if list(block.shape[1:]) == list(patch):
        return block
    tile = np.zeros((data.shape[0], *patch), np.float32)
    dst = tuple(slice(sl.start - (s - a), sl.stop - (s - a)) for sl, s, a in zip(src, start, lo))
    tile[(slice(None), *dst)] = block
    return tile


def _overlap(start: Sequence[int], patch: Sequence[int], lo: Sequence[int], shape: Sequence[int]
             ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slices in the tile, slices in the unpadded volume) of the part of a tile that covers real data."""
    src, dst = [], []
    for s, p, a, n in zip(start, patch, lo, shape):
        first, last = max(s - a, 0), min(s - a + p, n)
        dst.append(slice(first, last))
        src.append(slice(first - (s - a), last - (s - a)))
    return tuple(src), tuple(dst)
