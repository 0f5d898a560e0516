"""Another scanner setting for a synthetic task: the same anatomy drawn by the task, imaged differently.

A model deployed at a new site meets images from another scanner or protocol: other tissue contrast, noise,
sharpness and voxel size. :class:`Scanner` applies such a setting to every case a task draws
(``autoseg synth TASK OUT --scanner gamma=2.5,noise=0.05``), so a model trained on one setting can be tested,
and adapted (``autoseg train --init``), on another. Applied to each channel, in this order:

- ``gamma``: the case's intensities mapped through a power curve on their robust range (0.5th-99.5th
  percentile): the contrast between tissues changes, which per-image z-scoring does not undo;
- ``scale``, ``offset``: a linear calibration (CT numbers off by a factor and a shift);
- ``blur``: Gaussian blur of that many voxels (sigma): a softer reconstruction kernel;
- ``noise``: Gaussian noise, as a share of the robust range;
- ``spacing``: voxels that many times larger (image linear, labels nearest), the geometry's spacing to match.

The default setting changes nothing; the noise comes from its own generator per case, so the anatomy stays
the case's own whatever the setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from autoseg.errors import UserError
from autoseg.io import Geometry


@dataclass(frozen=True)
class Scanner:
    gamma: float = 1.0
    scale: float = 1.0
    offset: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    spacing: float = 1.0

    @property
    def is_default(self) -> bool:
        return self == Scanner()

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v != getattr(Scanner(), k)}


def parse_scanner(text: str | None) -> Scanner:
    """``"gamma=2.5,noise=0.05"`` -> :class:`Scanner` (empty or None: the task's own setting)."""
    if not text:
        return Scanner()
    known = {f.name for f in fields(Scanner)}
    values: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in known:
            raise UserError(f"--scanner {text}: unknown setting '{key}' (known: {', '.join(sorted(known))})")
        try:
            values[key] = float(value)
        except ValueError:
            raise UserError(f"--scanner {text}: '{key}' needs a number, got '{value}'") from None
        if not np.isfinite(values[key]):
            raise UserError(f"--scanner {text}: '{key}' must be finite")
    scanner = Scanner(**values)
    for key in ("gamma", "scale", "spacing"):
        if getattr(scanner, key) <= 0:
            raise UserError(f"--scanner {text}: '{key}' must be positive")
    if scanner.blur < 0 or scanner.noise < 0:
        raise UserError(f"--scanner {text}: blur and noise must be >= 0")
    return scanner


def image_as(scanner: Scanner, channel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One channel imaged with ``scanner`` (same dtype; integers rounded and clipped to it)."""
    from scipy.ndimage import gaussian_filter

    x = channel.astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(x, [0.5, 99.5]))
    span = max(hi - lo, 1e-6)
    if scanner.gamma != 1.0:
        x = lo + span * np.clip((x - lo) / span, 0, 1) ** scanner.gamma
    x = x * scanner.scale + scanner.offset
    if scanner.blur > 0:
        x = gaussian_filter(x, scanner.blur)
    if scanner.noise > 0:
        x = x + rng.normal(0, scanner.noise * span * abs(scanner.scale), x.shape).astype(np.float32)
    if np.issubdtype(channel.dtype, np.integer):
        info = np.iinfo(channel.dtype)
        return np.clip(np.round(x), info.min, info.max).astype(channel.dtype)
    return x.astype(channel.dtype)


def resample_case(channels: tuple[np.ndarray, ...], label: np.ndarray, geometry: Geometry, factor: float
                  ) -> tuple[tuple[np.ndarray, ...], np.ndarray, Geometry]:
    """Voxels ``factor`` times larger along every axis: images linear, labels nearest."""
    from scipy.ndimage import zoom

    new_shape = [max(2, int(round(s / factor))) for s in label.shape]
    ratios = [n / s for n, s in zip(new_shape, label.shape)]
    images = tuple(zoom(c.astype(np.float32), ratios, order=1).astype(c.dtype) for c in channels)
    seg = zoom(label, ratios, order=0).astype(label.dtype)
    spacing = tuple(sp * s / n for sp, s, n in zip(geometry.spacing, label.shape, new_shape))
    return images, seg, replace(geometry, spacing=spacing)


def apply_scanner(scanner: Scanner, channels: tuple[np.ndarray, ...], label: np.ndarray, geometry: Geometry,
                  rng: np.random.Generator) -> tuple[tuple[np.ndarray, ...], np.ndarray, Geometry]:
    """A drawn case's channels, label and geometry as ``scanner`` would image it."""
    if scanner.is_default:
        return channels, label, geometry
    if scanner.spacing != 1.0:
        channels, label, geometry = resample_case(channels, label, geometry, scanner.spacing)
    return tuple(image_as(scanner, c, rng) for c in channels), label, geometry
