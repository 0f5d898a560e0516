"""Vectorised drawing primitives for synthetic scans: random fields, soft-edged shapes, tubes, a scene.

Everything works on whole arrays (or an object's bounding box): no Python loop runs over voxels, only
over objects. Positions and sizes are in millimetres in array axis order (z, y, x), so the same code
draws on isotropic and anisotropic grids; a voxel's centre ``i`` lies at ``i * spacing``.

Shapes are given as signed distance maps (negative inside, about millimetres near the surface): a
label is where the distance is negative, and the image mixes intensities with a one-voxel ramp across
the surface, which is what partial volume looks like once the acquisition blur is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# scipy is imported inside the functions: `autoseg --help` lists the tasks without loading it

Region = tuple[tuple[slice, ...], np.ndarray]
"""A shape drawn in a bounding box: the box's slices into the full array and the distance map inside it."""

FAR = np.float32(1e6)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: float | Sequence[float]) -> np.ndarray:
    """A zero-mean, unit-std random field that varies over about ``cells`` voxels (per axis or for all).

    Wide fields are sums of Gaussian bumps on a coarse lattice, built axis by axis with small matrix
    products: far cheaper than filtering white noise with a wide kernel or spline upsampling.
    """
    from scipy import ndimage
    shape = tuple(int(s) for s in shape)
    cells = np.broadcast_to(np.asarray(cells, dtype=float), (len(shape),))
    if min(shape, default=0) == 0:
        return np.zeros(shape, np.float32)
    if cells.min() < 2.0:
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=cells / 2)
    else:
        field = rng.standard_normal([_lattice_size(s, c) for s, c in zip(shape, cells)], dtype=np.float32)
        for axis, (s, c) in enumerate(zip(shape, cells)):
            nodes = (np.arange(field.shape[axis]) - 2.5) * c
            basis = np.exp(-0.5 * ((np.arange(s)[:, None] - nodes[None, :]) / c) ** 2).astype(np.float32)
            field = np.moveaxis(np.tensordot(basis, field, axes=([1], [axis])), 0, axis)
    field = np.ascontiguousarray(field, dtype=np.float32)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _lattice_size(size: int, cell: float) -> int:
    return int(np.ceil(size / cell)) + 5


def random_rotation(rng: np.random.Generator, ndim: int, max_degrees: float = 180.0,
                    axis: int | None = None) -> np.ndarray:
    """A rotation matrix in array axis order; ``axis`` restricts a 3D rotation to turn about that axis."""
    from scipy.spatial.transform import Rotation
    if ndim == 2 or axis is not None:
        a = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
        c, s = np.cos(a), np.sin(a)
        if ndim == 2:
            return np.array([[c, -s], [s, c]])
        rot = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        rot[np.ix_([i, j], [i, j])] = [[c, -s], [s, c]]
        return rot
    if max_degrees >= 180.0:
        return Rotation.random(random_state=rng).as_matrix()
    return Rotation.from_rotvec(rng.normal(size=3) / np.sqrt(3) * np.deg2rad(max_degrees) * 0.6).as_matrix()


def ellipsoid(shape: Sequence[int], spacing: Sequence[float], center: Sequence[float], radii: Sequence[float],
              rotation: np.ndarray | None = None, wobble: float = 0.0,
              rng: np.random.Generator | None = None) -> Region:
    """An ellipsoid (ellipse in 2D), optionally with a smoothly deformed surface, as a distance map.

    ``rotation``'s columns are the ellipsoid's axes; ``wobble`` moves the surface by about that fraction
    of the smallest radius, so objects differ in shape, not only in size and pose.
    """
    spacing, center, radii = (np.asarray(v, dtype=float) for v in (spacing, center, radii))
    ndim = len(shape)
    rotation = np.eye(ndim) if rotation is None else rotation
    reach = np.sqrt(((rotation * radii) ** 2).sum(axis=1)) + 3 * wobble * radii.min() + 2 * spacing
    lo = np.maximum(np.floor((center - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((center + reach) / spacing).astype(int) + 1, shape)
    slices = tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))
    box = tuple(sl.stop - sl.start for sl in slices)
    if min(box) == 0:
        return slices, np.full(box, FAR, np.float32)
    offsets = [(np.arange(sl.start, sl.stop) * spacing[k] - center[k]).astype(np.float32).reshape(
        [-1 if i == k else 1 for i in range(ndim)]) for k, sl in enumerate(slices)]
    # float32 throughout (Python-float coefficients keep it so): full-volume objects stay cheap
    local = [sum(float(rotation[k, j]) * offsets[k] for k in range(ndim) if rotation[k, j] != 0)
             for j in range(ndim)]
    r = np.sqrt(sum((q * float(1 / a)) ** 2 for q, a in zip(local, radii)))
    grad = np.sqrt(sum((q * float(1 / a**2)) ** 2 for q, a in zip(local, radii))) / np.maximum(r, 1e-9)
    dist = (r - 1) / np.maximum(grad, float(1 / radii.max()))
    if wobble > 0:
        assert rng is not None, "a wobbly surface needs a random generator"
        dist -= float(wobble * radii.min()) * smooth_field(rng, box, np.minimum(radii, 3 * radii.min()) / spacing * 0.7)
    return slices, dist.astype(np.float32)


def random_curve(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
                 step: float, wiggle: float = 0.5) -> np.ndarray:
    """Points (N, ndim) every ``step`` mm along a smooth random curve leaving ``start`` along ``direction``."""
    from scipy import ndimage
    n = max(2, int(length / step))
    bend = ndimage.gaussian_filter1d(rng.standard_normal((n, len(start))), sigma=max(n / 8, 1.0), axis=0)
    bend /= max(float(np.abs(bend).max()), 1e-9)
    dirs = direction / np.linalg.norm(direction) + wiggle * bend
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return start + np.cumsum(dirs * step, axis=0)


def tubes(shape: Sequence[int], spacing: Sequence[float], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Distance map of tubes around centre-line ``points`` (mm) with per-point ``radii`` (mm).

    One Euclidean distance transform to the centre-line voxels, then each voxel subtracts the radius of
    its nearest centre-line voxel: cost independent of how many branches there are.
    """
    from scipy import ndimage
    spacing = np.asarray(spacing, dtype=float)
    idx = np.round(points / spacing).astype(int)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    if not inside.any():
        return np.full(shape, FAR, np.float32)
    radius = np.zeros(shape, np.float32)
    np.maximum.at(radius, tuple(idx[inside].T), radii[inside].astype(np.float32))
    dist, nearest = ndimage.distance_transform_edt(radius == 0, sampling=spacing, return_indices=True)
    return (dist - radius[tuple(nearest)]).astype(np.float32)


class Scene:
    """An image (C, *shape) and its label map, painted object by object, later objects on top.

    ``paint`` mixes an object's intensity into the image with a soft one-voxel edge and writes its label
    where the voxel centre is inside (or clears the label for an unlabelled distractor).
    """

    def __init__(self, rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                 background: Sequence[float]):
        self.rng = rng
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.image = np.empty((len(background), *self.shape), np.float32)
        for c, value in enumerate(background):
            self.image[c] = value
        self.label = np.zeros(self.shape, np.uint8)
        self.instances = np.zeros(self.shape, np.int32)  # objects painted with instance=True, 1..N
        self._last_instance = 0
        self.edge = min(self.spacing)
        self._textures: dict[float, np.ndarray] = {}

    def texture(self, grain: float) -> np.ndarray:
        """A unit random pattern of ``grain`` voxels over the whole image, drawn once per grain: objects
        that overlap share their tissue's grain, and drawing it once keeps many-object scenes fast."""
        if grain not in self._textures:
            self._textures[grain] = smooth_field(self.rng, self.shape, grain)
        return self._textures[grain]

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float], rotation: np.ndarray | None = None,
                  wobble: float = 0.0) -> Region:
        return ellipsoid(self.shape, self.spacing, center, radii, rotation, wobble, self.rng)

    def paint(self, region: Region, mean: float | Sequence[float], texture: float | Sequence[float] = 0.0,
              label: int | None = None, rim: float | Sequence[float] = 0.0, grain: float = 1.5,
              within: np.ndarray | None = None, keep: bool = False, instance: bool = False) -> np.ndarray | None:
        """Paint one object; ``within`` clips it to a kept parent's distance map (nested structures).

        ``instance`` gives the object its own id in :attr:`instances`; any other object painted over it
        clears the id where it covers it, so ids always follow the label map.

        ``texture`` scales a smooth random pattern of ``grain`` voxels; ``rim`` brightens a thin shell
        at the surface. Returns the object's distance map over the whole image when ``keep``.
        """
        slices, dist = region
        if within is not None:
            dist = np.maximum(dist, within[slices])
        channels = self.image.shape[0]
        mean, texture, rim = (np.broadcast_to(np.asarray(v, np.float32), (channels,)) for v in (mean, texture, rim))
        alpha = np.clip(0.5 - dist / self.edge, 0.0, 1.0)
        pattern = self.texture(grain)[slices] if texture.any() else 0.0
        shell = np.exp(-0.5 * (dist / (1.5 * self.edge)) ** 2) if rim.any() else 0.0
        for c in range(channels):
            value = mean[c] + texture[c] * pattern + rim[c] * shell
            view = self.image[c][slices]
            view += alpha * (value - view)
        inside = dist < 0
        self.label[slices][inside] = 0 if label is None else label
        if instance:
            self._last_instance += 1
        self.instances[slices][inside] = self._last_instance if instance else 0
        if not keep:
            return None
        full = np.full(self.shape, FAR, np.float32)
        full[slices] = dist
        return full


def blur(image: np.ndarray, sigma_voxels: float | Sequence[float]) -> np.ndarray:
    """The acquisition's point-spread function, per channel of a (C, *shape) image."""
    from scipy import ndimage
    return np.stack([ndimage.gaussian_filter(ch, sigma_voxels) for ch in image])


def bias_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], strength: float,
               scale_mm: float) -> np.ndarray:
    """A smooth multiplicative field around 1 (MRI coil inhomogeneity): exp(strength * field)."""
    return np.exp(strength * smooth_field(rng, shape, scale_mm / np.asarray(spacing)))


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude-image noise: the background floor is positive, as in real MRI."""
    real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def place_apart(rng: np.random.Generator, sample: Callable[[], np.ndarray], taken: list[tuple[np.ndarray, float]],
                radius: float, ok: Callable[[np.ndarray], bool] | None = None, tries: int = 100) -> np.ndarray | None:
    """Draw a centre with ``sample()`` at least ``radius`` plus each taken radius away from taken centres
    (and accepted by ``ok``); None when no draw succeeds, so crowded scenes get fewer objects."""
    for _ in range(tries):
        c = np.asarray(sample(), dtype=float)
        if all(np.linalg.norm(c - t) >= radius + r for t, r in taken) and (ok is None or ok(c)):
            return c
    return None
