"""Sliding-window inference over a preprocessed case: Gaussian-weighted tiles, batched through the network.

Works on the cache's 3-axis layout ``(C, Z, Y, X)`` for both kinds of configuration: a 3D network sees
tiles of ``patch``; a 2D network sees tiles of ``(1, *patch)`` with the slice axis squeezed, so the same
tiling, batching and accumulation serve both.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=8)
def gaussian_weights(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Importance map peaked at the tile centre: border voxels, which see less context, count less."""
    axes = [torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float32) - (n - 1) / 2) / max(n * sigma_scale, 1e-3)) ** 2)
            for n in patch]
    w = axes[0]
    for a in axes[1:]:
        w = w[..., None] * a
    w = w / w.max()
    return w.clamp_min(w[w > 0].min().item() if (w > 0).any() else 1e-6)


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread tile origins covering ``size`` with at least ``overlap`` between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = int(np.ceil((size - patch) / step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def _pad_to(data: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Zero-pad the spatial axes up to ``shape`` (centred); return the slices that undo it."""
    pads, crop = [], []
    for n, p in zip(data.shape[1:], shape):
        total = max(p - n, 0)
        lo = total // 2
        pads.append((lo, total - lo))
        crop.append(slice(lo, lo + n))
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]
    return (nn.functional.pad(data, flat) if any(flat) else data), crop


@torch.inference_mode()
def sliding_window(model: nn.Module, data: np.ndarray | torch.Tensor, patch: Sequence[int], num_classes: int,
                   ndim: int, device: str | torch.device = "cpu", overlap: float = 0.5,
                   mirror_axes: Sequence[int] = (), tile_batch: int = 4, precision: str = "fp32",
                   channels_last: bool = False, progress=None) -> torch.Tensor:
    """Logits ``(num_classes, Z, Y, X)`` (float32, on CPU) for a preprocessed case ``(C, Z, Y, X)``.

    ``mirror_axes`` are network axes (0..ndim-1) for test-time mirroring: every combination of flips is
    averaged. ``tile_batch`` tiles go through the network at once.
    """
    dev = torch.device(device)
    model.eval()
    x = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the cache is a read-only memory map
    full_patch = [1, *patch] if ndim == 2 else list(patch)
    x, crop = _pad_to(x, full_patch)
    shape = x.shape[1:]
    starts = list(itertools.product(*[tile_starts(s, p, overlap if ndim == 3 or i > 0 else 0.0)
                                      for i, (s, p) in enumerate(zip(shape, full_patch))]))
    weights = gaussian_weights(tuple(patch)).to(dev)
    acc = torch.zeros((num_classes, *shape), dtype=torch.float32, device=dev)
    norm = torch.zeros(shape, dtype=torch.float32, device=dev)
    flips = [list(c) for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    amp = AUTOCAST.get(precision)
    fmt = (torch.channels_last_3d if ndim == 3 else torch.channels_last) if channels_last else torch.contiguous_format
    for i in range(0, len(starts), tile_batch):
        group = starts[i:i + tile_batch]
        slices = [tuple(slice(s, s + p) for s, p in zip(st, full_patch)) for st in group]
        tiles = torch.stack([x[(slice(None), *sl)] for sl in slices]).to(dev)
        if ndim == 2:
            tiles = tiles[:, :, 0]
        tiles = tiles.contiguous(memory_format=fmt)
        out = None
        for f in flips:
            dims = [a + 2 for a in f]
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                y = model(torch.flip(tiles, dims) if dims else tiles)
            y = y[0] if isinstance(y, (list, tuple)) else y
            y = torch.flip(y.float(), dims) if dims else y.float()
            out = y if out is None else out + y
        out = out / len(flips) * weights
        for k, sl in enumerate(slices):
            tile = out[k][:, None] if ndim == 2 else out[k]
            acc[(slice(None), *sl)] += tile
            norm[sl] += weights if ndim == 3 else weights[None]
        if progress is not None:
            progress(len(group))
    acc /= norm
    return acc[(slice(None), *crop)].cpu()


def count_tiles(shape: Sequence[int], patch: Sequence[int], ndim: int, overlap: float = 0.5) -> int:
    full_patch = [1, *patch] if ndim == 2 else list(patch)
    n = 1
    for i, (s, p) in enumerate(zip(shape, full_patch)):
        n *= len(tile_starts(max(s, p), p, overlap if ndim == 3 or i > 0 else 0.0))
    return n
