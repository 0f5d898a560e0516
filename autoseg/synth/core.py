"""The task registry and the dataset writer behind ``autoseg synth``.

A task is data (:class:`TaskSpec`: channels, labels, file ending, shapes and case counts per size)
plus one function that draws a single case from a random generator. :func:`generate` gives every case
its own generator seeded from (seed, task, split, index), so a case does not depend on how many cases
are drawn or in which order or process, and writes the nnU-Net v2 raw layout.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import UserError
from autoseg.io import Geometry, write_image, write_label
from autoseg.synth.scanner import Scanner, apply_scanner
from autoseg.version import __version__

SIZES = ("tiny", "small", "bench")
DEFAULT_CASES = {"tiny": 5, "small": 16, "bench": 32}
TEST_CASES = {"tiny": 2, "small": 4, "bench": 8}
PROVENANCE_KEY = "autoseg_synth"
"""dataset.json key that marks a folder as written by :func:`generate` (so it may be overwritten)."""
_OWN_ENTRIES = {"dataset.json", "imagesTr", "labelsTr", "instancesTr", "imagesTs", "labelsTs", "instancesTs"}


@dataclass(frozen=True)
class SynthCase:
    """One drawn case: its channel arrays (all the same shape), label map and geometry, and for instance
    tasks the instance map (0 none, 1..N one object each)."""

    channels: tuple[np.ndarray, ...]
    label: np.ndarray
    geometry: Geometry
    instances: np.ndarray | None = None


CaseMaker = Callable[[np.random.Generator, tuple[int, ...], int], SynthCase]
"""Draws one case from (rng, nominal array shape for the size, case index within its split)."""


@dataclass(frozen=True)
class TaskSpec:
    """A synthetic task: what ``dataset.json`` declares, how big each size is, and how to draw a case."""

    name: str
    description: str
    channel_names: tuple[str, ...]
    labels: Mapping[str, int | list[int]]  # a list of values: a region (their union)
    shapes: Mapping[str, tuple[int, ...]]
    make_case: CaseMaker = field(repr=False)
    file_ending: str = ".nii.gz"
    cases: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_CASES))
    test_cases: Mapping[str, int] = field(default_factory=lambda: dict(TEST_CASES))
    regions_class_order: tuple[int, ...] = ()  # region tasks: the value each region paints, in order
    instance_classes: tuple[str, ...] = ()  # classes whose objects are instances (written to instancesTr)

    @property
    def prefix(self) -> str:
        return self.name.replace("-", "")

    @property
    def label_values(self) -> list[int]:
        """The foreground values a label file holds (regions are unions of them)."""
        return sorted({x for v in self.labels.values() for x in (v if isinstance(v, list) else [v])} - {0})

    def dataset_json(self, num_training: int, size: str, seed: int, scanner: Scanner | None = None) -> dict:
        return {
            "name": f"synth-{self.name}",
            "description": self.description,
            "channel_names": {str(i): c for i, c in enumerate(self.channel_names)},
            "labels": dict(self.labels),
            **({"regions_class_order": list(self.regions_class_order)} if self.regions_class_order else {}),
            **({"instance_classes": list(self.instance_classes)} if self.instance_classes else {}),
            "numTraining": num_training,
            "file_ending": self.file_ending,
            "licence": "CC0 (synthetic)",
            PROVENANCE_KEY: {"task": self.name, "size": size, "seed": seed, "version": __version__,
                             **({"scanner": scanner.to_dict()} if scanner and not scanner.is_default else {})},
        }


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, *, description: str, channels: tuple[str, ...], labels: Mapping[str, int | list[int]],
                  shapes: Mapping[str, tuple[int, ...]], file_ending: str = ".nii.gz",
                  cases: Mapping[str, int] | None = None,
                  regions_class_order: tuple[int, ...] = (),
                  instance_classes: tuple[str, ...] = ()) -> Callable[[CaseMaker], CaseMaker]:
    """Register the decorated case-drawing function as task ``name``; the keywords are its spec."""
    missing = set(SIZES) - set(shapes)
    if missing:
        raise ValueError(f"task {name}: no shape for size(s) {sorted(missing)}")

    def decorate(make_case: CaseMaker) -> CaseMaker:
        TASKS[name] = TaskSpec(name, description, tuple(channels), dict(labels), dict(shapes), make_case,
                               file_ending, dict(cases or DEFAULT_CASES), regions_class_order=tuple(regions_class_order),
                               instance_classes=tuple(instance_classes))
        return make_case

    return decorate


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown synthetic task '{name}'; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def case_rng(task: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one case: stable across runs, processes and the number of cases requested."""
    key = [seed % (1 << 64), zlib.crc32(task.encode()), 0 if split == "Tr" else 1, index]
    return np.random.default_rng(np.random.SeedSequence(key))


def draw_case(task: str, size: str = "tiny", index: int = 0, seed: int = 0, split: str = "Tr",
              scanner: Scanner | None = None) -> SynthCase:
    """Draw one case in memory, exactly as :func:`generate` would write it (for tests and notebooks)."""
    spec = get_task(task)
    case = spec.make_case(case_rng(task, seed, split, index), tuple(spec.shapes[size]), index)
    if scanner is None or scanner.is_default:
        return case
    # the scanner's noise from a generator of its own: the anatomy is the case's whatever the setting
    channels, label, geometry = apply_scanner(scanner, case.channels, case.label, case.geometry,
                                              case_rng(f"{task}:scanner", seed, split, index))
    return SynthCase(channels, label, geometry)


def generate(task: str, out_dir: Path | str, cases: int | None = None, size: str = "small", seed: int = 0,
             *, jobs: int | None = None, scanner: Scanner | None = None) -> Path:
    """Write a synthetic dataset for ``task`` in the nnU-Net v2 raw layout to ``out_dir`` and return it.

    ``out_dir`` becomes the dataset folder: ``dataset.json``, ``imagesTr``/``labelsTr`` with ``cases``
    training cases (default per size) and a few held-out cases in ``imagesTs`` with reference labels in
    ``labelsTs``. The same (task, size, cases, seed) gives the same data. The folder is built beside
    ``out_dir`` and moved into place at the end, so an interrupted run leaves nothing half-written;
    an existing non-empty ``out_dir`` is only replaced when an earlier ``generate`` wrote it.
    ``scanner`` images every case with another scanner setting (:mod:`autoseg.synth.scanner`), recorded in
    dataset.json.

    >>> generate("ct-aniso", "/tmp/Dataset001_CT", size="tiny")  # doctest: +SKIP
    """
    spec = get_task(task)
    if size not in SIZES:
        raise UserError(f"unknown size '{size}'; choose one of: {', '.join(SIZES)}")
    n_train = spec.cases[size] if cases is None else int(cases)
    if n_train < 1:
        raise UserError(f"the number of cases must be at least 1, got {n_train}")
    out = Path(out_dir)
    target = out.resolve()  # '.' or 'x/..' have no usable name or parent to build beside
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = _fresh_dir(target, "tmp")
    try:
        todo = [("Tr", i) for i in range(n_train)] + [("Ts", i) for i in range(spec.test_cases[size])]
        workers = jobs or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: _write_case(spec, work, size, seed, *job, scanner=scanner), todo))
        (work / "dataset.json").write_text(json.dumps(spec.dataset_json(n_train, size, seed, scanner), indent=2)
                                           + "\n")
        _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _write_case(spec: TaskSpec, root: Path, size: str, seed: int, split: str, index: int,
                scanner: Scanner | None = None) -> None:
    case = draw_case(spec.name, size, index, seed, split, scanner)
    case_id = f"{spec.prefix}_{'' if split == 'Tr' else 'ts'}{index:03d}"
    for c, channel in enumerate(case.channels):
        write_image(channel, case.geometry, root / f"images{split}" / f"{case_id}_{c:04d}{spec.file_ending}")
    write_label(case.label, case.geometry, root / f"labels{split}" / f"{case_id}{spec.file_ending}")
    if spec.instance_classes:
        assert case.instances is not None, f"task {spec.name} declares instance classes but drew no instance map"
        write_label(case.instances, case.geometry, root / f"instances{split}" / f"{case_id}{spec.file_ending}")


def is_own_output(path: Path) -> bool:
    """Whether ``path`` holds only what an earlier :func:`generate` wrote (so replacing it loses nothing)."""
    try:
        meta = json.loads((path / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    entries = {p.name for p in path.iterdir()}
    return isinstance(meta, dict) and PROVENANCE_KEY in meta and entries <= _OWN_ENTRIES


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose a new folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not is_own_output(out):
        raise UserError(f"{out}: folder is not empty and was not written by `autoseg synth`; "
                        "choose an empty or new folder")


def _fresh_dir(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` (made with mkdir, so it gets the user's usual permissions)."""
    path = out.parent / f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _move_into_place(work: Path, out: Path) -> None:
    """Move the finished dataset in. An existing folder (empty, or our own output) is kept and its
    contents swapped, so a shell sitting in it stays valid; dataset.json leaves first and arrives last,
    so at no moment does a mix of old and new files look like a complete dataset."""
    if not out.exists():
        os.replace(work, out)
        return
    trash = _fresh_dir(out, "old")
    folders = sorted(_OWN_ENTRIES - {"dataset.json"})
    for name in ["dataset.json", *folders]:
        if (out / name).exists():
            os.replace(out / name, trash / name)
    for name in [*folders, "dataset.json"]:
        if (work / name).exists():
            os.replace(work / name, out / name)
    work.rmdir()
    shutil.rmtree(trash, ignore_errors=True)
