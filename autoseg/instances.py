"""Instances: objects one by one, from a semantic label map or from a dataset's instance map.

An instance map holds 0 where there is no object and one id per object (docs/architecture.md, "Instances").
Where a dataset gives none, or a semantic network predicts, the instances of a class are its connected components (full
connectivity: 26 neighbours in 3D, 8 in 2D). Touching objects of one class merge into one component there;
the touching-object formulation separates them: the network learns an extra output, each object's interior
(:func:`interior_map`: 1 at its centre, falling to 0 at its border), and :func:`split_touching` grows one
seed per interior peak back over the class's mask with a watershed.

The per-case table (:func:`instance_table`) is what ``autoseg predict`` writes to ``OUT/instances.csv``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import cc3d
import numpy as np
from scipy import ndimage

from autoseg.io import Geometry

INTERIOR_THRESHOLD = 0.5  # interior probability above which a voxel belongs to an object's seed
CONTACT_RADIUS = 2  # voxels either side of the line where two objects meet that the interior loss weighs up


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask (full connectivity), ids 1..n; and n."""
    connectivity = 26 if mask.ndim == 3 else 8
    if mask.ndim not in (2, 3):
        raise ValueError(f"components of a {mask.ndim}D mask")
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask, np.uint8), connectivity=connectivity,
                                          return_N=True)
    return labels.astype(np.int32, copy=False), int(n)


def instances_from_labels(label: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Instance map of a label map: the connected components of each class in ``classes``, numbered on
    across classes (class by class, in the order given); int32, 0 elsewhere."""
    out = np.zeros(label.shape, np.int32)
    offset = 0
    for value in classes:
        comp, n = components(label == value)
        if n:
            out[comp > 0] = comp[comp > 0] + offset
            offset += n
    return out


def touching_ids(instances: np.ndarray) -> np.ndarray:
    """Ids of the instances that touch another instance (any id, any class): a voxel of one is a neighbour
    (full connectivity) of a voxel of the other. Sorted, unique."""
    inst = np.asarray(instances)
    found: list[np.ndarray] = []
    for offset in _half_neighbourhood(inst.ndim):
        a = inst[tuple(slice(max(0, -o), inst.shape[i] - max(0, o)) for i, o in enumerate(offset))]
        b = inst[tuple(slice(max(0, o), inst.shape[i] - max(0, -o)) for i, o in enumerate(offset))]
        where = (a != b) & (a > 0) & (b > 0)
        if where.any():
            found += [a[where], b[where]]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, inst.dtype)


def _half_neighbourhood(ndim: int) -> list[tuple[int, ...]]:
    """Offsets of half the full neighbourhood (each neighbour pair once): 4 in 2D, 13 in 3D."""
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * ndim, indexing="ij"), -1).reshape(-1, ndim)
    return [tuple(int(x) for x in o) for o in offsets if tuple(o) > (0,) * ndim]


@dataclass
class ClassInstances:
    """The instances of one class in one case: their sizes (voxels, ascending) and how many touch another."""

    sizes: list[int]
    touching: int


def instance_stats(instances: np.ndarray, label: np.ndarray, classes: Sequence[int]) -> dict[int, ClassInstances]:
    """Per class in ``classes``: the sizes of its instances (an instance's class is its voxels' label) and
    how many of them touch another instance. One bincount pass for sizes and classes."""
    inst = np.asarray(instances).ravel().astype(np.int64)
    sizes = np.bincount(inst)
    owner = np.zeros(sizes.size, np.int64)
    owner[inst] = np.asarray(label).ravel()  # any voxel's label: an instance has one class (validated)
    touching = np.zeros(sizes.size, bool)
    touching[touching_ids(instances).astype(np.int64)] = True
    out = {}
    for value in classes:
        ids = np.flatnonzero((owner == value) & (sizes > 0))
        ids = ids[ids > 0]
        out[int(value)] = ClassInstances(sorted(int(s) for s in sizes[ids]), int(touching[ids].sum()))
    return out


# --- the touching-object formulation -------------------------------------------------------------------


def interior_map(instances: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Each instance's distance to its own border, divided by its largest: 1 at the centre, down to just
    above 0 at the border, 0 outside every instance (float32). Touching instances get a valley between them,
    which is what lets a watershed part them. The distance is computed per instance inside its bounding box
    (padded by one voxel, so the box edge counts as border)."""
    inst = np.asarray(instances)
    out = np.zeros(inst.shape, np.float32)
    for i, box in enumerate(ndimage.find_objects(inst.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        mask = np.pad(inst[box] == i, 1)
        dist = ndimage.distance_transform_edt(mask, sampling=spacing)[(slice(1, -1),) * inst.ndim]
        top = dist.max()
        if top > 0:
            region = out[box]
            inside = mask[(slice(1, -1),) * inst.ndim]
            region[inside] = (dist[inside] / top).astype(np.float32)
    return out


def contact_zone(instances: np.ndarray, radius: int = CONTACT_RADIUS) -> np.ndarray:
    """Where two objects meet: the voxels with two different instance ids within ``radius`` voxels (a cube).
    The valley of the interior map between touching objects lies here, a sliver of each patch; the loss
    weighs it up (the separation border weights of the original U-Net paper) so the network learns it early."""
    inst = np.asarray(instances)
    size = 2 * int(radius) + 1
    big = np.iinfo(np.int32).max
    highest = ndimage.maximum_filter(inst.astype(np.int32, copy=False), size=size, mode="constant", cval=0)
    lowest = ndimage.minimum_filter(np.where(inst > 0, inst, big).astype(np.int32, copy=False), size=size,
                                    mode="constant", cval=big)
    return (lowest < big) & (highest > lowest)


def split_touching(label: np.ndarray, interior: np.ndarray, classes: Sequence[int],
                   threshold: float = INTERIOR_THRESHOLD, min_seed_voxels: int = 1) -> np.ndarray:
    """Instances of a predicted label map with touching objects parted: per class, the seeds are the
    connected components of (class & interior > ``threshold``) with at least ``min_seed_voxels`` voxels, and
    a watershed on the negated interior grows them over the class's mask (skimage). A component of the class
    without any seed stays one instance. int32, numbered on across classes."""
    from skimage.segmentation import watershed

    out = np.zeros(label.shape, np.int32)
    offset = 0
    for value in classes:
        mask = label == value
        if not mask.any():
            continue
        seeds, n = components(mask & (interior > threshold))
        if n and min_seed_voxels > 1:
            small = np.bincount(seeds.ravel()) < min_seed_voxels
            small[0] = False
            seeds[small[seeds]] = 0
            seeds, n = components(seeds > 0) if seeds.any() else (seeds, 0)
        grown = watershed(-interior, seeds, mask=mask) if n else np.zeros(label.shape, np.int32)
        # components of the class that no seed reached are objects too
        rest, m = components(mask & (grown == 0))
        grown = grown.astype(np.int32)
        grown[rest > 0] = rest[rest > 0] + n
        out[grown > 0] = grown[grown > 0] + offset
        offset += n + m
    return out


# --- the per-case table ----------------------------------------------------------------------------------


@dataclass
class InstanceRow:
    """One instance of one case, as ``instances.csv`` holds it: class name, size in voxels and mm³, centroid
    in physical (world) coordinates x, y, z as SimpleITK gives them, bounding box in index space (lower and
    upper, inclusive, per array axis) and the mean probability of its class over its voxels."""

    case: str
    instance: int
    class_name: str
    voxels: int
    volume_mm3: float
    centroid_x: float
    centroid_y: float
    centroid_z: float
    bbox: str  # "z0:z1,y0:y1,x0:x1" (array axis order, inclusive)
    mean_probability: float | None


CSV_COLUMNS = [f.name if f.name != "class_name" else "class" for f in fields(InstanceRow)]


def instance_table(case: str, instances: np.ndarray, label: np.ndarray, geometry: Geometry,
                   class_names: Mapping[int, str], probabilities: np.ndarray | None = None) -> list[InstanceRow]:
    """The rows of one case's instances, by id. ``probabilities`` ``(K, *spatial)`` (the model's maps in the
    input's array) give each instance the mean probability of its class; None leaves it empty."""
    inst = np.asarray(instances)
    flat = inst.ravel().astype(np.int64)
    sizes = np.bincount(flat)
    ids = [i for i in np.flatnonzero(sizes) if i > 0]
    if not ids:
        return []
    owner = np.zeros(sizes.size, np.int64)
    owner[flat] = np.asarray(label).ravel()
    coords = np.indices(inst.shape).reshape(inst.ndim, -1).astype(np.float64)
    centres = np.stack([np.bincount(flat, weights=c, minlength=sizes.size) for c in coords], 1)
    boxes = ndimage.find_objects(inst.astype(np.int64, copy=False))
    voxel_mm3 = float(np.prod(geometry.spacing))
    rows = []
    for i in ids:
        value = int(owner[i])
        centre = (centres[i] / sizes[i])[::-1]  # array (z, y, x) -> SimpleITK index (x, y, z)
        world = _to_world(centre, geometry)
        prob = None
        if probabilities is not None and value < probabilities.shape[0]:
            prob = round(float(probabilities[value][inst == i].astype(np.float32).mean()), 4)
        box = ",".join(f"{s.start}:{s.stop - 1}" for s in boxes[i - 1])
        rows.append(InstanceRow(case, int(i), class_names.get(value, str(value)), int(sizes[i]),
                                round(int(sizes[i]) * voxel_mm3, 4), *(round(float(w), 4) for w in world), box, prob))
    return rows


def _to_world(index_xyz: np.ndarray, geometry: Geometry) -> list[float]:
    """A continuous index (x, y[, z]) in world coordinates: origin + direction @ (spacing * index), padded
    to three coordinates (z = 0 for a 2D image)."""
    n = len(index_xyz)
    spacing_xyz = np.asarray(geometry.spacing, np.float64)[::-1]
    direction = np.asarray(geometry.direction, np.float64).reshape(n, n)
    world = np.asarray(geometry.origin, np.float64) + direction @ (spacing_xyz * index_xyz)
    return [*world.tolist(), *[0.0] * (3 - n)]


def rows_to_csv(rows: Sequence[InstanceRow]) -> str:
    """``instances.csv``'s text: a header and one line per row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        d = asdict(row)
        writer.writerow(["" if v is None else v for v in d.values()])
    return buf.getvalue()
