"""The fingerprint's data model: what ``plan`` reads about a dataset (``fingerprint.json``).

Extraction lives in :mod:`autoseg.fingerprint`; these records are what it produces and what the planner,
normalization and post-processing read back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoseg.artifacts import header, write_json
from autoseg.errors import UserError

SIDE_MARGIN = 0.55  # a class centred beyond this share of an axis (or below 1 - it) lies on one side


@dataclass
class CaseFingerprint:
    """Raw facts about one training case (spatial lists in array axis order z, y, x)."""

    id: str
    spacing: list[float]
    shape: list[int]
    cropped_shape: list[int]
    crop_box: list[list[int]]  # [[start, stop), ...] per axis, of the nonzero region of all channels
    source_hash: str  # content hash of the case's files: preprocessing re-runs when it changes
    class_voxels: dict[str, int] = field(default_factory=dict)  # label value (as str) -> voxels
    class_components: dict[str, int] = field(default_factory=dict)  # label value -> connected components
    class_extent_mm: dict[str, list[float]] = field(default_factory=dict)  # label value -> bbox size per axis
    class_center: dict[str, list[float]] = field(default_factory=dict)  # label value -> bbox centre / shape per axis
    # label value -> centroid per axis, (voxel index + 0.5) / shape (the quality flag's position range; absent
    # in fingerprints written before it was kept)
    class_centroid: dict[str, list[float]] = field(default_factory=dict)
    # instance classes only (datasets with instances): label value -> sizes of its instances in voxels
    # (ascending), and how many of them touch another instance
    instance_voxels: dict[str, list[int]] = field(default_factory=dict)
    instance_touching: dict[str, int] = field(default_factory=dict)


@dataclass
class ChannelStats:
    """Intensity statistics of one channel over foreground (label > 0) voxels, sampled with a fixed seed."""

    name: str
    modality: str  # "CT" when the channel name says so, else the name upper-cased ("MRI", "T2", "RGB", ...)
    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class ClassStats:
    """Label statistics of one class over the dataset."""

    value: int
    name: str
    cases_present: int
    volume_voxels: dict[str, float]  # {"median", "p5", "p95"} over cases where present
    volume_mm3: dict[str, float]  # {"median", "p5", "p95"}
    components_per_case: dict[str, float]  # {"median", "max"} over cases where present
    extent_mm: dict[str, list[float]]  # {"median": [...], "p95": [...]} per axis
    # {"p10": [...], "p90": [...]} per axis: where its bounding box's centre lies, as a share of the image (0..1)
    center: dict[str, list[float]] = field(default_factory=dict)
    # instance classes only: {"per_case": {"median", "max"}, "voxels": {"median", "p5", "p95"},
    # "volume_mm3": {...}, "touching_share": share of its instances touching another instance (any class)}
    instances: dict[str, Any] = field(default_factory=dict)

    def sided_axes(self) -> list[int]:
        """Axes along which the class lies on one side of the image's middle in 9 of 10 cases (its centre
        beyond 0.45-0.55): a left or right structure, say, labelled by its side."""
        lo, hi = self.center.get("p10", []), self.center.get("p90", [])
        return [a for a, (p10, p90) in enumerate(zip(lo, hi)) if p10 > SIDE_MARGIN or p90 < 1 - SIDE_MARGIN]


@dataclass
class Fingerprint:
    """Everything ``plan`` reads about a dataset; saved as ``fingerprint.json`` in the workdir."""

    dataset_name: str
    dataset_hash: str  # hash of dataset.json and every case's source_hash
    ndim: int  # spatial dimensions of the images (2 or 3)
    channel_names: list[str]
    labels: dict[str, int | list[int]]
    file_ending: str
    cases: list[CaseFingerprint]
    channels: list[ChannelStats]
    classes: list[ClassStats]
    median_spacing: list[float]
    median_shape: list[int]
    median_cropped_shape: list[int]
    anisotropy_ratio: float  # coarsest / finest median spacing
    regions_class_order: list[int] = field(default_factory=list)  # dataset.json's, for region datasets
    instance_classes: list[str] = field(default_factory=list)  # dataset.json's (names), for instance datasets
    meta: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def modalities(self) -> list[str]:
        return [c.modality for c in self.channels]

    def touching_share(self) -> float:
        """The largest share, over the instance classes, of instances touching another instance (0 without
        instances): what the planner reads to choose the touching-object formulation."""
        return max((float(c.instances.get("touching_share", 0.0)) for c in self.classes if c.instances), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("meta")
        return {**header("fingerprint"), **self.meta, **d}

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        d = dict(d)
        meta = {k: d.pop(k) for k in ("artifact", "format_version", "autoseg_version", "created_by") if k in d}
        d["cases"] = [CaseFingerprint(**c) for c in d["cases"]]
        d["channels"] = [ChannelStats(**c) for c in d["channels"]]
        d["classes"] = [ClassStats(**c) for c in d["classes"]]
        return cls(**d, meta=meta)

    def save(self, path: Path | str) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path | str) -> Fingerprint:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no fingerprint here; run `autoseg fingerprint` or `autoseg plan` first")
        try:
            d = json.loads(path.read_text())
            if d.get("artifact") != "fingerprint":
                raise ValueError("not a fingerprint file")
            return cls.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable fingerprint ({e}); delete it and run `autoseg fingerprint` again") from e
