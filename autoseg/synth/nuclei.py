"""The ``nuclei`` task: 2D brightfield H&E-like microscopy with touching and overlapping nuclei of two kinds.

Each nucleus is an instance (``instancesTr``), so the task exercises what a semantic map cannot tell:
where one of many touching objects ends. Stains are modelled in optical density (Beer-Lambert), so where
two nuclei overlap the image is darker, as in a real slide, and the label and instance id go to the one on
top. Densities vary per case, and a few clusters pack many nuclei edge to edge.
"""

from __future__ import annotations

import numpy as np

from autoseg.io import Geometry
from autoseg.synth.core import SynthCase, register_task
from autoseg.synth.draw import blur, ellipsoid, random_rotation, smooth_field

HEMATOXYLIN = np.array([0.65, 0.70, 0.29])  # optical density per RGB channel (Ruifrok & Johnston)
EOSIN = np.array([0.07, 0.99, 0.11])
ROUND, ELONGATED = 1, 2


@register_task("nuclei", channels=("R", "G", "B"),
               labels={"background": 0, "round_nucleus": 1, "elongated_nucleus": 2},
               instance_classes=("round_nucleus", "elongated_nucleus"),
               shapes={"tiny": (64, 64), "small": (128, 128), "bench": (256, 256)}, file_ending=".png",
               cases={"tiny": 6, "small": 20, "bench": 48},
               description="2D H&E-like microscopy (RGB as three PNG channels): small round dark nuclei and larger "
                           "elongated pale textured nuclei, touching and overlapping in clusters; one instance "
                           "per nucleus in instancesTr")
def nuclei(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Nuclei keep their size in pixels at every size (a bigger image holds more of them): round ones of 3-5 px
    radius, elongated ones of 7-10 by 3.5-5.5 px. About half of them sit in clusters where neighbours overlap
    by up to 45% of their radii; the rest are scattered at a per-case density."""
    shape = tuple(int(s) for s in shape)
    spacing = (1.0, 1.0)
    area = float(np.prod(shape))
    label = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int32)
    hema = np.zeros(shape, np.float32)  # hematoxylin optical density
    chromatin = smooth_field(rng, shape, 1.0)
    taken: list[tuple[np.ndarray, float]] = []
    size = np.asarray(shape, dtype=float)

    def add(kind: int, center: np.ndarray, min_gap: float) -> bool:
        if kind == ROUND:
            radii = rng.uniform(3.0, 5.0) * np.array([1.0, rng.uniform(0.85, 1.0)])
        else:
            radii = np.array([rng.uniform(7.0, 10.0), rng.uniform(3.5, 5.5)])
        reach = float(radii.mean())
        if any(np.linalg.norm(center - c) < min_gap * (reach + r) for c, r in taken):
            return False
        slices, dist = ellipsoid(shape, spacing, center, radii, random_rotation(rng, 2), 0.08, rng)
        inside = dist < 0
        if not inside.any():
            return False
        taken.append((center, reach))
        alpha = np.clip(0.5 - dist, 0.0, 1.0)
        if kind == ROUND:  # dense chromatin: dark and nearly uniform
            density = rng.uniform(0.9, 1.2) + 0.08 * chromatin[slices]
        else:  # vesicular: pale, coarse chromatin grains and a darker nuclear membrane
            density = (rng.uniform(0.35, 0.5) + 0.16 * chromatin[slices]
                       + 0.35 * np.exp(-0.5 * (dist / 1.2) ** 2))
        hema[slices] += alpha * np.maximum(density, 0.05)
        label[slices][inside] = kind
        instances[slices][inside] = len(taken)
        return True

    def kind() -> int:
        return ROUND if rng.random() < share_round else ELONGATED

    share_round = rng.uniform(0.35, 0.65)
    for _ in range(int(rng.integers(2, 5) * max(0.5, area / 128**2))):  # clusters: many touching nuclei
        centre = rng.uniform(0.15, 0.85, 2) * size
        spread = rng.uniform(6, 10)
        members = int(rng.integers(5, 12))
        for _ in range(members * 8):
            if members == 0:
                break
            members -= add(kind(), centre + rng.normal(0, spread, 2), rng.uniform(0.55, 0.75))
    scattered = int(area / 1000 * rng.uniform(0.4, 1.4))  # per-case density: 2 to 6 per 64x64
    for _ in range(scattered * 6):
        if scattered == 0:
            break
        scattered -= add(kind(), rng.uniform(0.02, 0.98, 2) * size, 1.05)
    for _ in range(int(area / 600)):  # debris and out-of-focus fragments: small, unlabelled, paler
        slices, dist = ellipsoid(shape, spacing, rng.uniform(0, 1, 2) * size, rng.uniform(0.8, 1.8, 2))
        hema[slices] += np.clip(0.5 - dist, 0.0, 1.0) * rng.uniform(0.2, 0.6)

    eosin = 0.25 + 0.1 * smooth_field(rng, shape, 12.0) + 0.06 * smooth_field(rng, shape, 2.0)
    eosin += 0.15 * blur((label > 0)[None].astype(np.float32), 3.0)[0]  # cytoplasm around the nuclei
    stains = np.stack([HEMATOXYLIN * rng.uniform(0.9, 1.1, 3), EOSIN * rng.uniform(0.9, 1.1, 3)])
    density = np.stack([blur(hema[None], 0.7)[0], np.maximum(eosin, 0.0)], axis=-1) @ stains  # (*shape, 3)
    rgb = 245.0 * np.exp(-density * rng.uniform(0.9, 1.2))
    rgb += rng.normal(0, 1, rgb.shape) * (0.8 * np.sqrt(np.maximum(rgb, 0)))
    channels = tuple(np.clip(np.round(rgb[..., c]), 0, 255).astype(np.uint8) for c in range(3))
    return SynthCase(channels, label, Geometry.identity(2), instances)
