"""The synthetic tasks: each one function that draws a case, registered with its spec.

Every task is built to be learnable from shape and context but not from intensity alone: unlabelled
distractors share the classes' intensities, textures, bias fields and noise make class intensity
distributions overlap, and edges are soft (partial volume). Sizes scale with the field of view, so
each class keeps a usable volume at every size.
"""

from __future__ import annotations

import numpy as np

from autoseg.io import Geometry
from autoseg.synth.core import SynthCase, register_task
from autoseg.synth.draw import (
    Scene,
    bias_field,
    blur,
    place_apart,
    random_curve,
    random_rotation,
    rician,
    tubes,
)

MRI_SHAPES = {"tiny": (28, 32, 32), "small": (56, 64, 64), "bench": (80, 112, 112)}


def jitter_shape(rng: np.random.Generator, shape: tuple[int, ...], frac: float = 0.1) -> tuple[int, ...]:
    """Shapes differ a little between cases, as in any real dataset."""
    return tuple(max(8, int(round(s * rng.uniform(1 - frac, 1 + frac)))) for s in shape)


def present_in(index: int) -> bool:
    """True for 3 of every 5 consecutive cases (0, 2, 4 of 0..4): a structure absent in ~40% of cases,
    with both outcomes among the first three cases of any split, so even tiny datasets show both."""
    return (3 * index) % 5 < 3


def in_ball(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A point drawn uniformly from the unit ball."""
    v = rng.normal(size=ndim)
    return v / np.linalg.norm(v) * rng.uniform() ** (1 / ndim)


def to_int16(image: np.ndarray) -> np.ndarray:
    """Scanners store integers; so do we (smaller files, and later stages must cope with int input)."""
    return np.clip(np.round(image), -32768, 32767).astype(np.int16)


def iso_geometry(spacing: tuple[float, ...]) -> Geometry:
    ndim = len(spacing)
    return Geometry(tuple(float(s) for s in spacing), (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))


@register_task("mri-nested", channels=("MRI",), labels={"background": 0, "organ": 1, "lesion": 2},
               shapes=MRI_SHAPES,
               description="3D MRI-like: an organ with lesions inside it; per-case scale, offset, bias field, noise")
def mri_nested(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Other organs as bright as the organ or the lesion, and a bias field that moves both by ~25%:
    the lesion is told apart by lying inside the organ, not by its brightness alone."""
    shape = jitter_shape(rng, shape)
    inplane = rng.uniform(0.9, 1.1)
    spacing = (rng.uniform(1.0, 1.4), inplane, inplane)
    fov = np.asarray(shape) * spacing
    width, mid = fov.min(), fov / 2
    scene = Scene(rng, shape, spacing, background=[0.0])
    scene.paint(scene.ellipsoid(mid, fov * rng.uniform(0.42, 0.47, 3), random_rotation(rng, 3, 10), 0.04),
                mean=0.42, texture=0.04)

    organ_center = mid + rng.uniform(-0.1, 0.1, 3) * fov
    organ_radii = width * rng.uniform(0.17, 0.26, 3)
    organ_rot = random_rotation(rng, 3)
    taken = [(organ_center, organ_radii.max())]
    for _ in range(rng.integers(1, 4)):  # other organs, as bright as the organ or the lesion
        r = width * rng.uniform(0.06, 0.13)
        c = place_apart(rng, lambda: mid + rng.uniform(-0.28, 0.28, 3) * fov, taken, r)
        if c is not None:
            taken.append((c, r))
            scene.paint(scene.ellipsoid(c, r * rng.uniform(0.7, 1.3, 3), random_rotation(rng, 3), 0.15),
                        mean=rng.uniform(0.55, 0.85), texture=0.05)
    organ = scene.paint(scene.ellipsoid(organ_center, organ_radii, organ_rot, 0.1),
                        mean=rng.uniform(0.6, 0.66), texture=0.05, label=1, keep=True)
    lesion_mean = rng.uniform(0.76, 0.86)
    for _ in range(1 + int(rng.random() < 0.4)):
        center = organ_center + organ_rot @ (in_ball(rng, 3) * 0.45 * organ_radii)
        radii = np.maximum(organ_radii.min() * rng.uniform(0.28, 0.45), 2.2 * max(spacing)) * rng.uniform(0.8, 1.2, 3)
        scene.paint(scene.ellipsoid(center, radii, random_rotation(rng, 3), 0.2),
                    mean=lesion_mean, texture=0.07, label=2, within=organ)

    image = blur(scene.image, 0.6)[0] * bias_field(rng, shape, spacing, 0.25, width * 0.6)
    image = rician(rng, image, 0.045) * rng.uniform(300, 1500) + rng.uniform(0, 150)
    return SynthCase((to_int16(image),), scene.label, iso_geometry(spacing))


@register_task("ct-aniso", channels=("CT",), labels={"background": 0, "liver": 1, "tumour": 2},
               shapes={"tiny": (12, 40, 40), "small": (24, 64, 64), "bench": (48, 128, 128)},
               description="3D CT-like in HU: liver with tumours (absent in 40% of cases); 2.5-5 mm slices, "
                           "oblique/flipped axes")
def ct_aniso(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Slice count varies with slice spacing over a fixed body length (shape[0] slices of 3.75 mm)."""
    inplane, slice_mm = rng.uniform(0.7, 0.9), rng.uniform(2.5, 5.0)
    length = shape[0] * 3.75 * rng.uniform(0.9, 1.1)
    shape = (max(6, int(round(length / slice_mm))), shape[1], shape[2])
    spacing = (slice_mm, inplane, inplane)
    fov = np.asarray(shape) * spacing
    w, mid = fov[1:].min(), fov / 2
    scene = Scene(rng, shape, spacing, background=[-1000.0])
    tilt = random_rotation(rng, 3, 8, axis=0)
    cylinder = 10 * fov[0]
    body = np.array([cylinder, w * rng.uniform(0.32, 0.37), w * rng.uniform(0.41, 0.46)])
    scene.paint(scene.ellipsoid(mid, body, tilt, 0.03), mean=-100, texture=10)  # subcutaneous fat
    scene.paint(scene.ellipsoid(mid, body * [1, *rng.uniform(0.8, 0.88, 2)], tilt, 0.04), mean=45, texture=12)
    for _ in range(rng.integers(2, 5)):  # visceral fat
        c = mid + [0, *rng.uniform(-0.2, 0.2, 2) * w]
        radii = [fov[0] * 0.3, *(w * rng.uniform(0.03, 0.07, 2))]
        scene.paint(scene.ellipsoid(c, radii, random_rotation(rng, 3), 0.2), mean=-90, texture=10)

    organ_center = mid + [rng.uniform(-0.1, 0.1) * fov[0], rng.uniform(-0.1, 0.02) * w, -rng.uniform(0.08, 0.15) * w]
    organ_radii = np.array([max(rng.uniform(0.22, 0.32) * fov[0], 1.5 * slice_mm), *(w * rng.uniform(0.15, 0.22, 2))])
    organ_rot = random_rotation(rng, 3, 25, axis=0)
    organ = scene.paint(scene.ellipsoid(organ_center, organ_radii, organ_rot, 0.12),
                        mean=rng.uniform(90, 115), texture=8, label=1, keep=True)
    if present_in(index):
        for _ in range(rng.integers(1, 4)):
            center = organ_center + organ_rot @ (in_ball(rng, 3) * 0.5 * organ_radii)
            r = organ_radii[1:].min() * rng.uniform(0.3, 0.5)
            radii = np.array([max(r, 1.2 * slice_mm), r, r]) * rng.uniform(0.8, 1.2, 3)
            scene.paint(scene.ellipsoid(center, radii, random_rotation(rng, 3, 30), 0.2),
                        mean=rng.uniform(35, 60), texture=10, rim=rng.uniform(0, 30), label=2, within=organ)
    _ct_neighbours(rng, scene, mid, w, fov)

    image = blur(scene.image, (0.45, 0.7, 0.7))[0]
    noise = blur(rng.standard_normal((1, *shape), dtype=np.float32), (0, 0.6, 0.6))[0]
    image += noise * (rng.uniform(8, 20) / max(float(noise.std()), 1e-6))
    return SynthCase((to_int16(np.clip(image, -1024, 3071)),), scene.label, _ct_geometry(rng, spacing))


def _ct_neighbours(rng: np.random.Generator, scene: Scene, mid: np.ndarray, w: float, fov: np.ndarray) -> None:
    """Unlabelled neighbours of the liver, as bright as or brighter than it: spine, aorta, kidneys.
    Painted last, so where they meet the liver they bound it, in the image and in the label alike."""
    cylinder = 10 * fov[0]
    spine = mid + [0, 0.22 * w, rng.uniform(-0.02, 0.02) * w]
    scene.paint(scene.ellipsoid(spine, [cylinder, 0.06 * w, 0.065 * w], None, 0.05), mean=350, texture=40, rim=500)
    aorta = spine + [0, -0.11 * w, 0.04 * w]
    scene.paint(scene.ellipsoid(aorta, [cylinder, 0.035 * w, 0.035 * w], None, 0.02), mean=rng.uniform(150, 220),
                texture=8)
    for side in (-1, 1):
        kidney = mid + [rng.uniform(-0.15, 0.15) * fov[0], 0.12 * w, side * 0.22 * w]
        radii = [max(0.2 * fov[0], 0.1 * w), 0.07 * w, 0.05 * w]
        scene.paint(scene.ellipsoid(kidney, radii, random_rotation(rng, 3, 20), 0.08),
                    mean=rng.uniform(100, 160), texture=10, rim=40)


def _ct_geometry(rng: np.random.Generator, spacing: tuple[float, ...]) -> Geometry:
    """Patient axes flipped against the image axes (LPS-like) and a per-case oblique turn about z."""
    a = np.deg2rad(rng.uniform(-12, 12))
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    direction = np.diag([-1.0, -1.0, 1.0]) @ turn
    origin = (rng.uniform(150, 220), rng.uniform(150, 220), rng.uniform(-700, -300))
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(d) for d in direction.ravel()))


def mri_channels(rng: np.random.Generator, scene: Scene, spacing: tuple[float, ...], width: float
                 ) -> tuple[np.ndarray, ...]:
    """A multi-channel MRI acquisition of ``scene``: blur, then per channel a bias field, Rician noise and the
    scanner's own scale and offset."""
    channels = []
    for ch in blur(scene.image, 0.6):
        ch = rician(rng, ch * bias_field(rng, scene.shape, spacing, 0.15, width * 0.6), 0.04)
        channels.append(to_int16(ch * rng.uniform(300, 1500) + rng.uniform(0, 50)))
    return tuple(channels)


@register_task("mr-2ch", channels=("T1", "T2"), labels={"background": 0, "edema": 1, "enhancing": 2},
               shapes=MRI_SHAPES,
               description="3D two-channel MRI (T1, T2): one class bright in T2 only, one in T1 only; "
                           "both channels needed")
def mr_2ch(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Scalp and bleeds are bright in both channels and CSF in T2: no single channel separates the classes."""
    shape = jitter_shape(rng, shape)
    inplane = rng.uniform(0.9, 1.1)
    spacing = (rng.uniform(0.9, 1.3), inplane, inplane)
    fov = np.asarray(shape) * spacing
    width, mid = fov.min(), fov / 2
    scene = Scene(rng, shape, spacing, background=[0.0, 0.0])
    head = fov * rng.uniform(0.42, 0.47, 3)
    rot = random_rotation(rng, 3, 8)
    scene.paint(scene.ellipsoid(mid, head, rot, 0.03), mean=(0.85, 0.7), texture=0.05)
    scene.paint(scene.ellipsoid(mid, head * rng.uniform(0.84, 0.88), rot, 0.04), mean=(0.55, 0.42), texture=0.04)

    taken: list[tuple[np.ndarray, float]] = []
    kinds = [("csf", rng.integers(1, 3)), ("bleed", rng.integers(0, 3)),
             ("edema", rng.integers(1, 3)), ("enhancing", rng.integers(1, 3))]
    looks = {"csf": ((0.2, 0.92), (0.05, 0.12), None), "bleed": ((0.82, 0.8), (0.05, 0.1), None),
             "edema": ((0.46, 0.82), (0.1, 0.17), 1), "enhancing": ((0.85, 0.45), (0.07, 0.12), 2)}
    for kind, count in kinds:
        mean, (rmin, rmax), label = looks[kind]
        for _ in range(count):
            r = width * rng.uniform(rmin, rmax)
            c = place_apart(rng, lambda: mid + rng.uniform(-0.22, 0.22, 3) * fov, taken, r)
            if c is None:
                continue
            taken.append((c, r))
            radii = r * rng.uniform(0.7, 1.3, 3)
            scene.paint(scene.ellipsoid(c, radii, random_rotation(rng, 3), 0.2),
                        mean=np.add(mean, rng.uniform(-0.03, 0.03, 2)), texture=0.06, label=label)

    return SynthCase(mri_channels(rng, scene, spacing, width), scene.label, iso_geometry(spacing))


@register_task("png-2d", channels=("microscopy",), labels={"background": 0, "round_cell": 1, "long_cell": 2},
               shapes={"tiny": (64, 64), "small": (128, 128), "bench": (256, 256)}, file_ending=".png",
               cases={"tiny": 6, "small": 20, "bench": 48},
               description="2D grayscale PNG microscopy: round haloed cells vs elongated granular cells, debris")
def png_2d(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """The two cell types share their mean intensity; shape, halo and grain tell them apart."""
    spacing = (1.0, 1.0)
    w = float(min(shape))
    size = np.asarray(shape, dtype=float)
    scene = Scene(rng, shape, spacing, background=[95.0])
    taken: list[tuple[np.ndarray, float]] = []
    cells = [1, 2] + list(rng.permutation([1] * rng.integers(1, 4) + [2] * rng.integers(1, 4)))
    for label in cells:
        if label == 1:
            r = w * rng.uniform(0.06, 0.09)
            radii = r * np.array([1.0, rng.uniform(0.8, 1.0)])
        else:
            r = w * rng.uniform(0.09, 0.13)
            radii = r * np.array([1.0, rng.uniform(0.35, 0.55)])
        c = place_apart(rng, lambda: rng.uniform(0.08, 0.92, 2) * size, taken, r + 2)
        if c is None:
            continue
        taken.append((c, r))
        region = scene.ellipsoid(c, radii, random_rotation(rng, 2), 0.12)
        if label == 1:
            scene.paint(region, mean=rng.uniform(125, 145), texture=10, rim=45, grain=2.0, label=1)
        else:
            scene.paint(region, mean=rng.uniform(130, 150), texture=24, grain=1.0, label=2)
    for _ in range(rng.integers(3, 9)):  # debris: small bright specks
        c = rng.uniform(0, 1, 2) * size
        scene.paint(scene.ellipsoid(c, w * rng.uniform(0.012, 0.03, 2)), mean=rng.uniform(150, 195))

    image = blur(scene.image, 0.7)[0] * bias_field(rng, shape, spacing, 0.15, w * 0.6)
    image += rng.normal(0, 1, image.shape) * (1.2 * np.sqrt(np.maximum(image, 0)))
    return SynthCase((np.clip(np.round(image), 0, 255).astype(np.uint8),), scene.label, Geometry.identity(2))


@register_task("vessels", channels=("MRA",), labels={"background": 0, "vessel": 1, "lesion": 2},
               shapes={"tiny": (32, 32, 32), "small": (64, 64, 64), "bench": (80, 112, 112)},
               description="3D angiography-like (hard): thin branching vessels and small low-contrast lesions "
                           "(absent in 40% of cases)")
def vessels(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Thin branches lose contrast to partial volume; bright blobs mimic vessel cross-sections and a
    mottled tissue texture mimics the lesions."""
    shape = jitter_shape(rng, shape, 0.05)
    s = rng.uniform(0.7, 0.9)
    spacing = (s, s, s)
    fov = np.asarray(shape) * s
    scene = Scene(rng, shape, spacing, background=[0.35])
    scene.paint(((slice(None),) * 3, np.full(shape, -1.0, np.float32)), mean=0.35, texture=0.04, grain=3.0)
    scale = max(1, round(max(shape) / 40))
    for _ in range(rng.integers(2, 6) * scale):
        c = rng.uniform(0, 1, 3) * fov
        scene.paint(scene.ellipsoid(c, s * rng.uniform(1.5, 3.5, 3), random_rotation(rng, 3), 0.1),
                    mean=rng.uniform(0.55, 0.8), texture=0.03)
    points, radii = vessel_tree(rng, fov, s, branches=int(rng.integers(6, 10) * scale))
    vessel = tubes(shape, spacing, points, radii)
    scene.paint(((slice(None),) * 3, vessel), mean=rng.uniform(0.72, 0.8), texture=0.03, label=1)
    if present_in(index):
        taken: list[tuple[np.ndarray, float]] = []
        for _ in range(rng.integers(1, 4)):
            r = s * rng.uniform(2.5, 4.5)
            c = place_apart(rng, lambda: rng.uniform(0.15, 0.85, 3) * fov, taken, r,
                            ok=lambda c: vessel[tuple(np.round(c / s).astype(int))] > r + s)  # noqa: B023
            if c is None:
                continue
            taken.append((c, r))
            scene.paint(scene.ellipsoid(c, r * rng.uniform(0.8, 1.2, 3), random_rotation(rng, 3), 0.2),
                        mean=0.35 + rng.uniform(0.12, 0.18), texture=0.04, label=2)

    image = blur(scene.image, 0.5)[0] * bias_field(rng, shape, spacing, 0.15, fov.min() * 0.6)
    image = rician(rng, image, 0.05) * rng.uniform(200, 1000)
    return SynthCase((to_int16(image),), scene.label, iso_geometry(spacing))


def vessel_tree(rng: np.random.Generator, fov: np.ndarray, voxel: float, branches: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points (N, 3) and radii (mm) of a tree that enters through one face and branches
    inside the field of view, each branch thinner than its parent."""
    step = 0.4 * voxel
    axis, side = int(rng.integers(0, 3)), int(rng.integers(0, 2))
    start = rng.uniform(0.25, 0.75, 3) * fov
    start[axis] = side * fov[axis]
    target = rng.uniform(0.3, 0.7, 3) * fov
    target[axis] = (1 - side) * fov[axis]
    trunk = _inside(random_curve(rng, start, target - start, 1.5 * fov.max(), step, wiggle=0.4), fov)
    lines, radii = [trunk], [voxel * rng.uniform(1.8, 2.6) * np.linspace(1.0, 0.75, len(trunk))]
    for _ in range(branches):
        parent = int(rng.choice(len(lines), p=_weights([r[0] for r in radii])))
        if len(lines[parent]) < 4:
            continue
        k = int(rng.integers(1, len(lines[parent]) - 2))
        r = radii[parent][k] * rng.uniform(0.55, 0.8)
        if r < 0.6 * voxel:
            continue
        along = lines[parent][k + 1] - lines[parent][k]
        across = np.cross(along, rng.normal(size=3))
        inward = fov / 2 - lines[parent][k]
        direction = (along / np.linalg.norm(along) + rng.uniform(0.8, 1.6) * across / np.linalg.norm(across)
                     + 0.5 * inward / max(float(np.linalg.norm(inward)), 1e-6))
        line = _inside(random_curve(rng, lines[parent][k], direction, fov.max() * rng.uniform(0.3, 0.7), step), fov)
        lines.append(line)
        radii.append(np.maximum(r * np.linspace(1.0, 0.7, len(line)), 0.6 * voxel))
    return np.concatenate(lines), np.concatenate(radii)


def _inside(line: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The part of a curve before it first leaves the field of view."""
    out = np.flatnonzero(np.any((line < 0) | (line > fov), axis=1))
    return line[: out[0]] if len(out) else line


def _weights(values: list[float]) -> np.ndarray:
    w = np.asarray(values, dtype=float) ** 2
    return w / w.sum()


@register_task("kidneys-lr", channels=("MRI",), labels={"background": 0, "left_kidney": 1, "right_kidney": 2},
               shapes={"tiny": (20, 32, 48), "small": (40, 64, 96), "bench": (64, 96, 144)},
               description="3D MRI-like: two alike kidneys in a mirror-symmetric body, labelled by side "
                           "(image x axis): nothing but the side tells them apart")
def kidneys_lr(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Paired organs with a class per side, as left/right kidneys, lungs or hippocampi, without the asymmetric
    anatomy (liver, heart) that tells the side in a real scan: a network sees the side only from where the
    organ lies against the spine and the body wall. Training with mirroring on x shows it each organ under the
    other's label half of the time (the case for nnU-Net's no-mirroring trainer)."""
    shape = jitter_shape(rng, shape)
    inplane = rng.uniform(0.9, 1.1)
    spacing = (rng.uniform(1.2, 1.6), inplane, inplane)
    fov = np.asarray(shape) * spacing
    mid = fov / 2
    scene = Scene(rng, shape, spacing, background=[0.0])
    body = fov * [0.6, rng.uniform(0.38, 0.42), rng.uniform(0.43, 0.47)]
    scene.paint(scene.ellipsoid(mid, body, random_rotation(rng, 3, 4, axis=0), 0.03), mean=0.4, texture=0.05)
    spine = mid + [0, 0.22 * fov[1], 0]
    scene.paint(scene.ellipsoid(spine, [fov[0], 0.07 * fov[1], 0.06 * fov[2]]), mean=0.75, texture=0.05)
    for _ in range(rng.integers(1, 4)):  # bowel loops, as bright as a kidney, anywhere in front of the spine
        c = mid + [rng.uniform(-0.3, 0.3) * fov[0], rng.uniform(-0.25, 0.05) * fov[1], rng.uniform(-0.3, 0.3) * fov[2]]
        scene.paint(scene.ellipsoid(c, fov[2] * rng.uniform(0.04, 0.07, 3), random_rotation(rng, 3), 0.2),
                    mean=rng.uniform(0.6, 0.75), texture=0.05)
    offset = rng.uniform(0.2, 0.26) * fov[2]
    for label, side in ((1, -1), (2, 1)):  # x below the middle: left_kidney; each drawn alike, on its own
        c = mid + [rng.uniform(-0.12, 0.12) * fov[0], rng.uniform(0.08, 0.14) * fov[1],
                   side * offset * rng.uniform(0.9, 1.1)]
        radii = np.array([fov[0] * rng.uniform(0.22, 0.3), *(fov[2] * rng.uniform(0.07, 0.1, 2))])
        scene.paint(scene.ellipsoid(c, radii, random_rotation(rng, 3, 20), 0.1), mean=rng.uniform(0.62, 0.72),
                    texture=0.06, rim=0.08, label=label)
    image = blur(scene.image, 0.6)[0] * bias_field(rng, shape, spacing, 0.15, fov.min() * 0.6)
    image = rician(rng, image, 0.04) * rng.uniform(300, 1500) + rng.uniform(0, 100)
    return SynthCase((to_int16(image),), scene.label, iso_geometry(spacing))


@register_task("lung-nodules", channels=("CT",), labels={"background": 0, "lung": 1, "nodule": 2},
               instance_classes=("nodule",),
               shapes={"tiny": (20, 40, 40), "small": (40, 72, 72), "bench": (64, 112, 112)},
               description="3D chest CT-like in HU (hard): two lungs with vessel trees and a few solid nodules "
                           "a few voxels across (absent in 40% of cases); vessel cross-sections and calcified "
                           "granulomas are unlabelled look-alikes")
def lung_nodules(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """A nodule is a soft-tissue ball of 2.5-6 mm in lung air, as bright as the vessels around it: in any one
    slice a vessel's cross-section looks the same, so only the 3D shape (round, not tubular) tells it; small
    calcified granulomas are round too, but brighter. Slices of 1.25-2.5 mm keep the smallest nodules at two or
    three slices."""
    inplane, slice_mm = rng.uniform(0.65, 0.85), rng.uniform(1.25, 2.5)
    length = shape[0] * 1.8 * rng.uniform(0.9, 1.1)
    shape = (max(8, int(round(length / slice_mm))), shape[1], shape[2])
    spacing = (slice_mm, inplane, inplane)
    fov = np.asarray(shape) * spacing
    w, mid = fov[1:].min(), fov / 2
    scene = Scene(rng, shape, spacing, background=[-1000.0])
    body = np.array([10 * fov[0], w * rng.uniform(0.38, 0.42), w * rng.uniform(0.45, 0.48)])
    scene.paint(scene.ellipsoid(mid, body, random_rotation(rng, 3, 5, axis=0), 0.02), mean=-90, texture=10)
    scene.paint(scene.ellipsoid(mid, body * [1, 0.9, 0.92], random_rotation(rng, 3, 5, axis=0), 0.03),
                mean=40, texture=12)  # muscle and mediastinum
    lungs, voxel = [], min(spacing)
    for side in (-1, 1):
        c = mid + [rng.uniform(-0.05, 0.05) * fov[0], rng.uniform(-0.04, 0.04) * w, side * w * rng.uniform(0.2, 0.24)]
        radii = np.array([fov[0] * rng.uniform(0.55, 0.7), w * rng.uniform(0.27, 0.31), w * rng.uniform(0.15, 0.18)])
        lungs.append(scene.paint(scene.ellipsoid(c, radii, random_rotation(rng, 3, 10, axis=0), 0.08),
                                 mean=rng.uniform(-870, -830), texture=20, label=1, keep=True))
    lung = np.minimum(*lungs)  # distance map of both lungs
    points, radii = vessel_tree(rng, fov, voxel, branches=int(rng.integers(8, 14)))
    vessel = np.maximum(tubes(shape, spacing, points, radii), lung)  # vessels inside the lungs only
    scene.paint(((slice(None),) * 3, vessel), mean=rng.uniform(20, 50), texture=10, label=1)
    taken: list[tuple[np.ndarray, float]] = []
    inside = (lambda r: lambda c: _at(lung, c, spacing) < -2 * r and _at(vessel, c, spacing) > r + voxel)  # noqa: E731
    for _ in range(rng.integers(1, 4)) if present_in(index) else ():
        r = rng.uniform(1.25, 3.0)
        c = place_apart(rng, lambda: rng.uniform(0.1, 0.9, 3) * fov, taken, r, ok=inside(r))
        if c is not None:
            taken.append((c, r))
            scene.paint(scene.ellipsoid(c, r * rng.uniform(0.85, 1.15, 3), random_rotation(rng, 3), 0.15),
                        mean=rng.uniform(0, 60), texture=8, label=2, instance=True)
    for _ in range(rng.integers(0, 3)):  # calcified granulomas: round and small, but brighter than any nodule
        r = rng.uniform(0.8, 1.8)
        c = place_apart(rng, lambda: rng.uniform(0.1, 0.9, 3) * fov, taken, r, ok=inside(r))
        if c is not None:
            taken.append((c, r))
            scene.paint(scene.ellipsoid(c, [r, r, r]), mean=rng.uniform(250, 600), label=1)
    image = blur(scene.image, (0.4, 0.6, 0.6))[0]
    noise = blur(rng.standard_normal((1, *shape), dtype=np.float32), (0, 0.5, 0.5))[0]
    image += noise * (rng.uniform(15, 35) / max(float(noise.std()), 1e-6))
    return SynthCase((to_int16(np.clip(image, -1024, 3071)),), scene.label, _ct_geometry(rng, spacing),
                     scene.instances)


def _at(dist: np.ndarray, point_mm: np.ndarray, spacing: tuple[float, ...]) -> float:
    """A distance map's value at a point in mm (nearest voxel; far outside the image)."""
    idx = np.round(np.asarray(point_mm) / np.asarray(spacing)).astype(int)
    if np.any(idx < 0) or np.any(idx >= np.asarray(dist.shape)):
        return float("inf")
    return float(dist[tuple(idx)])


BRATS_LOOKS = {  # mean intensity per channel (T1, T1ce, T2, FLAIR)
    "white matter": (0.62, 0.6, 0.4, 0.48), "grey matter": (0.5, 0.5, 0.55, 0.56),
    "csf": (0.22, 0.22, 0.9, 0.18),  # ventricles: bright in T2 like oedema, dark in FLAIR
    "vessel": (0.55, 0.92, 0.45, 0.5),  # enhances like the rim, but is no ring around a core
    "oedema": (0.5, 0.52, 0.82, 0.86), "enhancing": (0.56, 0.95, 0.62, 0.64), "necrosis": (0.32, 0.24, 0.86, 0.55),
}


@register_task("brats-like", channels=("T1", "T1ce", "T2", "FLAIR"),
               labels={"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]},
               regions_class_order=(1, 2, 3), shapes=MRI_SHAPES,
               description="3D four-channel brain MRI with nested tumours trained as regions (BraTS): oedema bright "
                           "in T2/FLAIR, an enhancing rim bright in T1ce around a necrotic core dark in T1ce")
def brats_like(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """Label 1 oedema, 2 necrotic core, 3 enhancing rim, nested in that order inside a brain. Ventricles are
    bright in T2 like oedema (FLAIR tells them apart) and vessels enhance like the rim (only the rim encloses a
    core): each class needs more than one channel, and the regions (whole tumour, core, enhancing) overlap."""
    shape = jitter_shape(rng, shape)
    inplane = rng.uniform(0.9, 1.1)
    spacing = (rng.uniform(0.9, 1.2), inplane, inplane)
    fov = np.asarray(shape) * spacing
    width, mid = fov.min(), fov / 2
    looks = {k: np.add(v, rng.uniform(-0.03, 0.03, 4)) for k, v in BRATS_LOOKS.items()}
    scene = Scene(rng, shape, spacing, background=[0.0] * 4)
    head, rot = fov * rng.uniform(0.42, 0.47, 3), random_rotation(rng, 3, 8)
    scene.paint(scene.ellipsoid(mid, head, rot, 0.03), mean=looks["grey matter"], texture=0.04)
    scene.paint(scene.ellipsoid(mid, head * rng.uniform(0.7, 0.78), rot, 0.1), mean=looks["white matter"],
                texture=0.04)
    for side in (-1, 1):  # the lateral ventricles
        c = mid + rot @ np.array([0.0, -0.05, side * 0.1]) * fov
        scene.paint(scene.ellipsoid(c, width * np.array([0.1, 0.05, 0.03]), rot, 0.1), mean=looks["csf"], texture=0.03)

    side = rng.choice([-1, 1])
    centre = mid + rot @ (np.array([rng.uniform(-0.08, 0.08), rng.uniform(-0.12, 0.12), side * 0.15]) * fov)
    radius = width * rng.uniform(0.17, 0.23)
    oedema = scene.paint(scene.ellipsoid(centre, radius * rng.uniform(0.8, 1.2, 3), random_rotation(rng, 3), 0.2),
                         mean=looks["oedema"], texture=0.05, label=1, keep=True)
    core_centre = centre + in_ball(rng, 3) * 0.15 * radius
    rim = scene.paint(scene.ellipsoid(core_centre, radius * rng.uniform(0.55, 0.7, 3), random_rotation(rng, 3), 0.15),
                      mean=looks["enhancing"], texture=0.05, label=3, within=oedema, keep=True)
    scene.paint(scene.ellipsoid(core_centre, radius * rng.uniform(0.35, 0.42, 3), random_rotation(rng, 3), 0.15),
                mean=looks["necrosis"], texture=0.05, label=2, within=rim)
    taken = [(centre, radius)]
    for _ in range(rng.integers(1, 3)):  # enhancing vessels elsewhere in the brain
        r = width * rng.uniform(0.03, 0.05)
        c = place_apart(rng, lambda: mid + rng.uniform(-0.22, 0.22, 3) * fov, taken, r)
        if c is not None:
            taken.append((c, r))
            scene.paint(scene.ellipsoid(c, r * rng.uniform(0.7, 1.3, 3), random_rotation(rng, 3), 0.2),
                        mean=looks["vessel"], texture=0.04)

    return SynthCase(mri_channels(rng, scene, spacing, width), scene.label, iso_geometry(spacing))


@register_task("brain-mets", channels=("T1ce",), labels={"background": 0, "brain": 1, "metastasis": 2},
               instance_classes=("metastasis",),
               shapes=MRI_SHAPES,
               description="3D contrast-enhanced brain MRI: several small metastases (2-5 mm radius, none in 40% of "
                           "cases) among enhancing vessels and choroid plexus that look like them")
def brain_mets(rng: np.random.Generator, shape: tuple[int, ...], index: int) -> SynthCase:
    """A metastasis is a small sphere with an enhancing rim (a solid one when small) inside the brain. Vessels
    enhance as brightly, so in one slice a vessel's cross-section looks like a small metastasis; the choroid
    plexus is round and bright beside the dark ventricles. Only shape in 3D (round, not tubular) and place tell
    them apart. Added after the small-class rules were chosen, to check them on a task they were not tuned on."""
    shape = jitter_shape(rng, shape)
    s = rng.uniform(0.9, 1.1)
    spacing = (rng.uniform(1.0, 1.3), s, s)
    fov = np.asarray(shape) * spacing
    width, mid = fov.min(), fov / 2
    scene = Scene(rng, shape, spacing, background=[0.0])
    head, rot = fov * rng.uniform(0.42, 0.47, 3), random_rotation(rng, 3, 8)
    scene.paint(scene.ellipsoid(mid, head, rot, 0.03), mean=0.3, texture=0.04, rim=0.3)  # scalp: bright fat rim
    brain = scene.paint(scene.ellipsoid(mid, head * 0.88, rot, 0.06), mean=0.5, texture=0.05, label=1, keep=True)
    scene.paint(scene.ellipsoid(mid, head * rng.uniform(0.62, 0.7), rot, 0.1), mean=0.56, texture=0.04,
                label=1, within=brain)  # white matter: what is painted inside the brain stays brain
    taken: list[tuple[np.ndarray, float]] = []
    for side in (-1, 1):  # ventricles, each with a choroid plexus: round and enhancing, but no metastasis
        c = mid + rot @ np.array([0.0, -0.05, side * 0.1]) * fov
        scene.paint(scene.ellipsoid(c, width * np.array([0.1, 0.05, 0.03]), rot, 0.1), mean=0.15, texture=0.03,
                    label=1, within=brain)
        plexus = c + rot @ np.array([0.0, 0.02, 0.0]) * fov
        scene.paint(scene.ellipsoid(plexus, [2.5, 2.0, 2.0], random_rotation(rng, 3), 0.2), mean=0.85, texture=0.05,
                    label=1, within=brain)
        taken.append((c, width * 0.1))
    points, radii = vessel_tree(rng, fov, min(spacing), branches=int(rng.integers(6, 10)))
    vessel = np.maximum(tubes(shape, spacing, points, radii * 0.6), brain)  # enhancing vessels inside the brain
    scene.paint(((slice(None),) * 3, vessel), mean=rng.uniform(0.8, 0.9), texture=0.04, label=1)
    for _ in range(rng.integers(1, 6)) if present_in(index) else ():
        r = max(rng.uniform(2.0, 5.0) * min(1.0, width / 60), 2.0)  # the tiny size's small brain holds them too
        c = place_apart(rng, lambda: mid + rot @ (in_ball(rng, 3) * 0.75 * head), taken, r + 2,
                        ok=lambda c, r=r: _at(brain, c, spacing) < -1.5 * r and _at(vessel, c, spacing) > r + 1)
        if c is None:
            continue
        taken.append((c, r))
        solid = r < 2.5
        scene.paint(scene.ellipsoid(c, r * rng.uniform(0.85, 1.15, 3), random_rotation(rng, 3), 0.15),
                    mean=rng.uniform(0.75, 0.9) if solid else rng.uniform(0.4, 0.55), texture=0.05,
                    rim=0.0 if solid else rng.uniform(0.3, 0.45), label=2, within=brain, instance=True)
    image = blur(scene.image, 0.6)[0] * bias_field(rng, shape, spacing, 0.15, width * 0.6)
    image = rician(rng, image, 0.05) * rng.uniform(300, 1500) + rng.uniform(0, 50)
    return SynthCase((to_int16(image),), scene.label, iso_geometry(spacing), scene.instances)
