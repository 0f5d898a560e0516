"""Per-channel intensity normalization, looked up by the scheme name stored in plans.json.

A scheme is one function ``(channel, Normalization, mask) -> channel`` registered under its name; adding
one is one decorated function. ``mask`` is the (hole-filled) nonzero mask of the case, or None when the
configuration does not normalize inside a mask.

>>> normalize(images, [Normalization("ct", clip_low=-100, clip_high=300, mean=50, std=80)])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from autoseg.errors import UserError
from autoseg.schema.fingerprint import ChannelStats, Fingerprint
from autoseg.schema.plans import NORMALIZATION_SCHEMES, Normalization, Plans
from autoseg.schema.registry import Registry

Normalizer = Callable[[np.ndarray, Normalization, "np.ndarray | None"], np.ndarray]
NORMALIZERS: Registry[Normalizer] = Registry("normalization scheme", NORMALIZATION_SCHEMES)
MIN_STD = 1e-8  # a constant channel divides by this instead of 0


@NORMALIZERS.register("ct")
def ct(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Clip to the dataset's foreground percentiles, then z-score with the dataset's foreground statistics:
    CT intensities are calibrated (Hounsfield units), so one global transform keeps them comparable."""
    missing = [k for k in ("clip_low", "clip_high", "mean", "std") if getattr(norm, k) is None]
    if missing:
        raise UserError(f"plans.json: the 'ct' normalization needs {', '.join(missing)} "
                        "(the planner fills them from the fingerprint)")
    x = np.clip(x, norm.clip_low, norm.clip_high)
    return ((x - norm.mean) / max(norm.std, MIN_STD)).astype(np.float32)


@NORMALIZERS.register("zscore")
def zscore(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Per image z-score: uncalibrated intensities (MRI) only mean something relative to the image itself.
    With ``use_mask`` the statistics come from inside the mask, and voxels outside it are set to 0."""
    if not (norm.use_mask and mask is not None):
        return ((x - x.mean(dtype=np.float64)) / max(float(x.std(dtype=np.float64)), MIN_STD)).astype(np.float32)
    out = np.zeros_like(x, dtype=np.float32)
    inside = x[mask]
    if inside.size:
        out[mask] = (inside - inside.mean(dtype=np.float64)) / max(float(inside.std(dtype=np.float64)), MIN_STD)
    return out


@NORMALIZERS.register("rescale")
def rescale(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Natural 8-bit images (PNG): map [0, 255] to [0, 1]."""
    return (x / 255.0).astype(np.float32)


@NORMALIZERS.register("none")
def identity(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    return x.astype(np.float32, copy=True)


def normalize(images: np.ndarray, schemes: Sequence[Normalization], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalize each channel of ``images`` (C, ...) with its scheme; returns a new float32 array."""
    if len(schemes) != images.shape[0]:
        raise UserError(f"plans.json: {len(schemes)} normalization entries for {images.shape[0]} image channel(s)")
    out = np.empty(images.shape, np.float32)
    for c, norm in enumerate(schemes):
        out[c] = normalizer(norm.scheme)(images[c], norm, mask)
    return out


def normalizer(name: str) -> Normalizer:
    if name not in NORMALIZERS:
        raise UserError(f"plans.json: unknown normalization scheme '{name}' (known: {', '.join(sorted(NORMALIZERS))})")
    return NORMALIZERS[name]


def resolve(schemes: Sequence[Normalization], channels: Sequence[ChannelStats] | None) -> list[Normalization]:
    """Fill a ``ct`` scheme's missing clip bounds and statistics from the fingerprint's foreground statistics,
    so a hand-written plan may say just ``{"scheme": "ct"}``; values already in the plan win."""
    out = []
    for c, norm in enumerate(schemes):
        if norm.scheme == "ct" and channels is not None and c < len(channels):
            s = channels[c]
            filled = {"clip_low": s.percentile_00_5, "clip_high": s.percentile_99_5, "mean": s.mean, "std": s.std}
            norm = replace(norm, **{k: v for k, v in filled.items() if getattr(norm, k) is None})
        out.append(norm)
    return out


def resolve_plans(plans: Plans, fingerprint: Fingerprint | None) -> Plans:
    """``plans`` with every configuration's normalization resolved against the fingerprint's statistics (a
    hand-written ``ct`` scheme's clip bounds and moments filled in, as preprocessing did)."""
    if fingerprint is None:
        return plans
    configs = {k: replace(c, normalization=resolve(c.normalization, fingerprint.channels))
               for k, c in plans.configurations.items()}
    return replace(plans, configurations=configs)
