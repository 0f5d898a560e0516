"""The nnU-Net v2 raw dataset layout, read unchanged.

::

    DATASET/dataset.json
    DATASET/imagesTr/CASE_0000.nii.gz   one file per channel (_0000, _0001, ...)
    DATASET/labelsTr/CASE.nii.gz
    DATASET/imagesTs/CASE_0000.nii.gz   optional
    DATASET/instancesTr/CASE.nii.gz     optional: instance ids (0 none, 1..N one object each)

``dataset.json`` holds ``channel_names`` (index -> name; the name says the modality, e.g. "CT"),
``labels`` (name -> value, or name -> list of values for regions), ``numTraining`` and ``file_ending``;
optionally ``regions_class_order``, an ``ignore`` label (the highest value) and ``instance_classes`` (the
names of the classes whose objects are instances; docs/architecture.md, "Instances") and ``segment_codes``
(class name -> ``{"category": "SCHEME:VALUE:MEANING", "type": "SCHEME:VALUE:MEANING"}``, the coded segment
category and type a DICOM SEG output carries; selection.json and the bundle keep them, docs/architecture.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.errors import DatasetError, Problem, UserError
from autoseg.io import SUPPORTED_ENDINGS
from autoseg.schema.instances import INSTANCE_FOLDERS, instance_classes
from autoseg.schema.labels import (
    foreground_classes,
    has_regions,
    ignore_label_of,
    region_problems,
    regions_of,
)

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order, its label file (None for test cases) and its instance
    map (``instancesTr/CASE<ending>``; None where the dataset has none: the instances are then the
    connected components of the instance classes)."""

    id: str
    images: tuple[Path, ...]
    label: Path | None = None
    instances: Path | None = None


@dataclass
class Dataset:
    """A parsed ``dataset.json`` plus where the dataset lives."""

    root: Path
    channel_names: list[str]
    labels: dict[str, int | list[int]]
    num_training: int
    file_ending: str
    regions_class_order: list[int] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.raw.get("name") or self.root.name)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        return ignore_label_of(self.labels)

    @property
    def has_regions(self) -> bool:
        return has_regions(self.labels)

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """Region name -> the label values it unites ({} for a plain label map)."""
        return regions_of(self.labels)

    @property
    def label_values(self) -> list[int]:
        """Integer values that may appear in label files (region labels are unions of these)."""
        vals: set[int] = set()
        for v in self.labels.values():
            vals.update(v if isinstance(v, list) else [v])
        return sorted(vals)

    @property
    def classes(self) -> dict[int, str]:
        return foreground_classes(self.labels)

    @property
    def instance_classes(self) -> dict[int, str]:
        """Label value -> name of the classes dataset.json's ``instance_classes`` names ({} for none;
        names that are not plain labels are left to ``validate`` to report)."""
        return dict(sorted(instance_classes(self.raw).items()))

    @property
    def has_instances(self) -> bool:
        """Whether the dataset has instances: instance classes named, or an ``instancesTr/`` folder."""
        return bool(self.instance_classes) or (self.root / INSTANCE_FOLDERS["Tr"]).is_dir()

    def cases(self, split: str = "Tr") -> list[Case]:
        """Cases found on disk, sorted by id. ``split`` is 'Tr' or 'Ts'."""
        return list_cases(self.root / f"images{split}", self.file_ending, self.num_channels,
                          self.root / "labelsTr" if split == "Tr" else None,
                          self.root / INSTANCE_FOLDERS["Tr"] if split == "Tr" else None)


def _ending_ok(ending: object) -> bool:
    return isinstance(ending, str) and ending.lower() in SUPPORTED_ENDINGS


def parse_dataset_json(root: Path) -> tuple[Dataset | None, list[Problem]]:
    """Parse and check ``root/dataset.json``; return the dataset (None if unusable) and every problem."""
    root = Path(root)
    path = root / "dataset.json"
    where = str(path)
    if not root.is_dir():
        return None, [Problem(str(root), "dataset folder not found")]
    if not path.is_file():
        return None, [Problem(where, "missing: a dataset needs dataset.json (nnU-Net v2 layout)")]
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [Problem(where, f"not valid JSON ({e})")]
    except OSError as e:
        return None, [Problem(where, f"cannot read ({e.strerror or e})")]
    if not isinstance(raw, dict):
        return None, [Problem(where, "must hold a JSON object")]
    problems = [Problem(where, f"lacks the required key '{k}'") for k in REQUIRED_KEYS if k not in raw]
    if problems:
        return None, problems

    channels = raw["channel_names"]
    if not isinstance(channels, dict) or not channels:
        problems.append(Problem(where, "'channel_names' must be a non-empty object like {\"0\": \"CT\"}"))
        channel_names: list[str] = []
    else:
        try:
            order = sorted(channels, key=int)
        except ValueError:
            order = []
            problems.append(Problem(where, "'channel_names' keys must be channel indices 0, 1, ..."))
        if order and [int(k) for k in order] != list(range(len(order))):
            problems.append(Problem(where, f"'channel_names' indices must be 0..{len(order) - 1}, got {order}"))
        channel_names = [str(channels[k]) for k in order]

    labels = raw["labels"]
    if not isinstance(labels, dict) or not labels:
        problems.append(Problem(where, "'labels' must be a non-empty object like {\"background\": 0, \"organ\": 1}"))
        labels = {}
    label_problems = _check_labels(labels, where) if labels else []
    problems += label_problems

    n = raw["numTraining"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(Problem(where, f"'numTraining' must be a non-negative integer, got {n!r}"))
    ending = raw["file_ending"]
    if not _ending_ok(ending):
        problems.append(Problem(where, f"'file_ending' {ending!r} is not supported (use one of {', '.join(SUPPORTED_ENDINGS)})"))
    rco = raw.get("regions_class_order")
    problems += _check_regions(labels, rco, where, values_ok=not label_problems)
    if not problems:
        problems += _check_segment_codes(raw, labels, where)
    if problems:
        return None, problems
    return Dataset(root, channel_names, dict(labels), n, ending.lower(), rco, raw), []


def _check_segment_codes(raw: dict, labels: dict, where: str) -> list[Problem]:
    """``segment_codes``, if given, read as a ``--segment-codes`` file is and naming only classes of ``labels``:
    a typo caught at validation, not when the model is packed after training."""
    from autoseg.schema.labels import scored_classes
    from autoseg.schema.segment_codes import check_codes, parse_segment_codes

    if "segment_codes" not in raw:
        return []
    try:
        check_codes(parse_segment_codes(raw["segment_codes"], "segment_codes"),
                    list(scored_classes(labels).values()), "segment_codes", owner="the dataset")
    except UserError as e:
        return [Problem(where, str(e))]
    return []


def _check_labels(labels: dict, where: str) -> list[Problem]:
    """Background 0, consecutive values, distinct names per value, and an integer ignore label above the rest.

    With regions (a label mapping to a list of values, as in BraTS) the values that must be consecutive are
    all the integers the labels mention, since a label file holds those.
    """
    empty = [k for k, v in labels.items() if v == []]
    if empty:
        return [Problem(where, f"label '{k}' is an empty region ([]): list the label values it unites, e.g. [1, 2]")
                for k in empty]
    bad = [k for k, v in labels.items() if not (_is_int(v) or (isinstance(v, list) and v and all(map(_is_int, v))))]
    if bad:
        return [Problem(where, f"label '{k}' must map to an integer (or a list of integers for a region)") for k in bad]
    problems = []
    plain = {k: v for k, v in labels.items() if isinstance(v, int)}
    if plain.get("background", None) != 0 and 0 not in plain.values():
        problems.append(Problem(where, "labels must start with background = 0"))
    elif plain.get("background", 0) != 0:
        problems.append(Problem(where, f"'background' must be 0, got {plain['background']}"))
    if "ignore" in labels and not _is_int(labels["ignore"]):
        problems.append(Problem(where, f"the 'ignore' label must be one integer, got {labels['ignore']!r}"))
    values = sorted(v for k, v in plain.items() if k != "ignore")
    if len(set(values)) != len(values):
        problems.append(Problem(where, "two labels share a value"))
    mentioned = sorted({x for k, v in labels.items() if k != "ignore" for x in (v if isinstance(v, list) else [v])})
    if mentioned and mentioned != list(range(len(mentioned))):
        problems.append(Problem(where, f"label values must be consecutive integers from 0, got {mentioned}"))
    if _is_int(labels.get("ignore")) and mentioned and labels["ignore"] <= max(mentioned):
        problems.append(Problem(where, f"the 'ignore' label must be the highest value, got {labels['ignore']}"))
    return problems


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_regions(labels: dict, rco: object, where: str, values_ok: bool = True) -> list[Problem]:
    """Region training needs ``regions_class_order``: one label value per region, painting the regions back into
    the label map they came from (:func:`autoseg.schema.labels.region_problems`)."""
    if rco is not None and not (isinstance(rco, list) and all(map(_is_int, rco))):
        return [Problem(where, "'regions_class_order' must be a list of integers")]
    if not any(isinstance(v, list) for v in labels.values()):
        return []
    regions = [k for k in labels if k not in ("background", "ignore") and labels[k] != 0]
    if rco is None:
        return [Problem(where, "labels define regions (lists of values) but 'regions_class_order' is missing; "
                               f"give one value per region ({len(regions)})")]
    if len(rco) != len(regions):
        return [Problem(where, f"'regions_class_order' has {len(rco)} entries but labels define {len(regions)} regions")]
    return [Problem(where, message) for message in region_problems(labels, rco)] if values_ok else []


def load_dataset(root: Path | str) -> Dataset:
    """Parse ``dataset.json``; raise :class:`DatasetError` listing every problem in it."""
    ds, problems = parse_dataset_json(Path(root))
    if ds is None:
        raise DatasetError(problems)
    return ds


def list_cases(images_dir: Path, file_ending: str, num_channels: int, labels_dir: Path | None,
               instances_dir: Path | None = None) -> list[Case]:
    """Group ``CASE_XXXX<ending>`` files into cases; channels missing here are left for ``validate`` to name.
    With an existing ``instances_dir`` every case names its instance file there (missing ones too)."""
    if not images_dir.is_dir():
        return []
    found: dict[str, dict[int, Path]] = {}
    for p in images_dir.iterdir():
        if p.name.startswith(".") or not p.name.lower().endswith(file_ending):  # hidden: macOS "._x", our temps
            continue
        m = _CHANNEL_RE.match(p.name[: -len(file_ending)])
        if m:
            found.setdefault(m["case"], {})[int(m["channel"])] = p
    cases = []
    for cid in sorted(found):
        images = tuple(images_dir / f"{cid}_{c:04d}{file_ending}" for c in range(num_channels))
        label = labels_dir / f"{cid}{file_ending}" if labels_dir is not None else None
        has_instances = instances_dir is not None and instances_dir.is_dir()
        cases.append(Case(cid, images, label, instances_dir / f"{cid}{file_ending}" if has_instances else None))
    return cases
