"""A benchmark suite file (TOML): which datasets, which methods, and the wall-clock budget of each run.

    [suite]
    name = "smoke"
    budget = "2m"            # training wall clock of every run (a method may set its own)
    device = "cpu"
    jobs = 2                 # worker processes for planning, preprocessing and evaluation

    [datasets.ct-aniso]      # a synthetic-suite task, generated on the fly
    synth = "ct-aniso"
    size = "tiny"
    seed = 0

    [datasets.mine]          # a dataset folder with imagesTr/labelsTr and held-out imagesTs/labelsTs
    path = "../data/Dataset042_Mine"

    [datasets.pyradiomics]   # a real-data tier dataset (autoseg.benchmark.realdata)
    real = "pyradiomics"

    [methods.autoseg]
    kind = "autoseg"         # autoseg plan -> train --fold 0 -> predict; options: planner, budget, search,
    planner = "default"      #   configuration, folds
    search = false

    [methods.nnunet]
    kind = "command"         # any command that writes one prediction per test image into {predictions}
    command = "{python} nnunet_runner.py --dataset {dataset} --output {predictions} --budget-s {budget_s}"
    requires = "../.venv-nnunet/bin/nnUNetv2_train"   # skipped (with the reason) when missing

Relative paths (``path``, ``requires``, a ``planner`` file) are relative to the suite file's folder, and commands
run there.
Every mistake is one line naming the file and the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import UserError
from autoseg.plan.budget import parse_duration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHOD_KINDS = ("autoseg", "command")
REAL_DATASETS = ("pyradiomics", "mricron-aal")
COMMAND_FIELDS = ("python", "dataset", "images_ts", "predictions", "budget_s", "work", "timings", "jobs", "device",
                  "suite_dir")
"""Placeholders a command template may use, e.g. ``{predictions}``."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a suite: exactly one of ``synth`` (a task name), ``path`` or ``real``."""

    name: str
    synth: str | None = None
    size: str = "small"
    seed: int = 0
    cases: int | None = None
    path: Path | None = None
    real: str | None = None

    @property
    def source(self) -> str:
        if self.synth:
            return f"synth {self.synth} ({self.size}, seed {self.seed})"
        return f"real-data tier: {self.real}" if self.real else str(self.path)


@dataclass(frozen=True)
class MethodSpec:
    """One method of a suite: autoseg with options, or an external command that writes predictions."""

    name: str
    kind: str
    budget_s: float | None = None  # None: the suite's
    planner: str = "default"
    search: bool = False
    configuration: str | None = None
    folds: int = 5
    command: str | None = None
    requires: tuple[Path, ...] = ()
    timeout_s: float | None = None  # a command still running after this is killed (default: from the budget)

    def describe(self) -> str:
        if self.kind == "command":
            return f"command: {self.command}"
        bits = [f"planner {self.planner}", f"search {'on' if self.search else 'off'}", f"{self.folds} folds, fold 0"]
        if self.configuration:
            bits.append(f"configuration {self.configuration}")
        return "autoseg (" + ", ".join(bits) + ")"


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    file: Path
    name: str
    budget_s: float
    device: str = "cpu"
    jobs: int = 2
    datasets: tuple[DatasetSpec, ...] = ()
    methods: tuple[MethodSpec, ...] = ()
    notes: str = ""

    @property
    def folder(self) -> Path:
        return self.file.parent

    def budget_of(self, method: MethodSpec) -> float:
        return method.budget_s if method.budget_s is not None else self.budget_s


class _Reader:
    """Typed access to one TOML table, with errors that name the file and the key."""

    def __init__(self, file: Path, where: str, table: object):
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail(where, "must be a table")
        self.table: dict = table
        self.used: set[str] = set()

    def fail(self, key: str, what: str) -> None:
        raise UserError(f"{self.file}: {key}: {what}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}"

    def get(self, name: str, kind: type | tuple[type, ...], default: object = None, required: bool = False):
        self.used.add(name)
        if name not in self.table:
            if required:
                self.fail(self.key(name), "missing")
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                                 list: "a list"}[k] for k in kinds)
            self.fail(self.key(name), f"must be {names}, got {value!r}")
        return value

    def duration(self, name: str, required: bool = False) -> float | None:
        value = self.get(name, (str, int, float), required=required)
        if value is None:
            return None
        try:
            return parse_duration(str(value))
        except UserError as e:
            self.fail(self.key(name), str(e))

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            self.fail(self.key(unknown[0]), "unknown key (misspelt?)")


def load_suite(path: Path | str) -> Suite:
    """Parse and check a suite file; a :class:`UserError` names the file and the key of the first problem."""
    file = Path(path).resolve()
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: suite file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the suite file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    top = _Reader(file, "(top level)", raw)
    head = _Reader(file, "suite", top.get("suite", dict, {}))
    name = head.get("name", str, file.stem)
    budget = head.duration("budget", required=True)
    device = head.get("device", str, "cpu")
    jobs = head.get("jobs", int, 2)
    if jobs < 1:
        head.fail("suite.jobs", "must be >= 1")
    notes = head.get("notes", str, "")
    head.done()
    datasets = _tables(top, "datasets", _dataset)
    methods = _tables(top, "methods", _method)
    top.done()
    return Suite(file, name, budget, device, jobs, tuple(datasets), tuple(methods), notes)


def _tables(top: _Reader, key: str, parse) -> list:
    tables = top.get(key, dict, required=True)
    if not tables:
        top.fail(key, f"needs at least one [{key}.NAME] table")
    out = []
    for name, table in tables.items():
        if not _NAME.match(name) or "__" in name:
            top.fail(f"{key}.{name}", "names may use letters, digits, '.', '_' and '-' (no '__')")
        out.append(parse(_Reader(top.file, f"{key}.{name}", table), name))
    return out


def _dataset(r: _Reader, name: str) -> DatasetSpec:
    from autoseg.synth import SIZES, TASKS

    synth, path, real = r.get("synth", str), r.get("path", str), r.get("real", str)
    if sum(x is not None for x in (synth, path, real)) != 1:
        r.fail(r.where, "give exactly one of synth = \"TASK\", path = \"DIR\" or real = \"NAME\"")
    size, seed, cases = r.get("size", str, "small"), r.get("seed", int, 0), r.get("cases", int)
    if synth is not None and synth not in TASKS:
        r.fail(r.key("synth"), f"unknown task '{synth}' (one of {', '.join(sorted(TASKS))})")
    if size not in SIZES:
        r.fail(r.key("size"), f"must be one of {', '.join(SIZES)}, got '{size}'")
    if cases is not None and cases < 1:
        r.fail(r.key("cases"), "must be >= 1")
    if real is not None and real not in REAL_DATASETS:
        r.fail(r.key("real"), f"unknown real-data set '{real}' (one of {', '.join(REAL_DATASETS)})")
    r.done()
    return DatasetSpec(name, synth=synth, size=size, seed=seed, cases=cases,
                       path=None if path is None else (r.file.parent / path).resolve(), real=real)


def _method(r: _Reader, name: str) -> MethodSpec:
    kind = r.get("kind", str, required=True)
    if kind not in METHOD_KINDS:
        r.fail(r.key("kind"), f"must be one of {', '.join(METHOD_KINDS)}, got '{kind}'")
    budget = r.duration("budget")
    timeout = r.duration("timeout")
    requires = r.get("requires", (str, list), [])
    requires = [requires] if isinstance(requires, str) else requires
    if not all(isinstance(x, str) for x in requires):
        r.fail(r.key("requires"), "must be a path or a list of paths")
    if kind == "autoseg":
        planner, search = r.get("planner", str, "default"), r.get("search", bool, False)
        if planner.endswith(".py"):  # a planner file, relative to the suite's folder like every path here
            planner = str((r.file.parent / planner).resolve())
        configuration, folds = r.get("configuration", str), r.get("folds", int, 5)
        if folds < 2:
            r.fail(r.key("folds"), "must be >= 2")
        r.done()
        return MethodSpec(name, kind, budget, planner, search, configuration, folds,
                          requires=tuple((r.file.parent / p).resolve() for p in requires), timeout_s=timeout)
    command = r.get("command", str, required=True)
    for placeholder in re.findall(r"{([^{}]*)}", command):
        if placeholder not in COMMAND_FIELDS:
            r.fail(r.key("command"), f"unknown placeholder {{{placeholder}}} (use {', '.join(COMMAND_FIELDS)})")
    r.done()
    return MethodSpec(name, kind, budget, command=command,
                      requires=tuple((r.file.parent / p).resolve() for p in requires), timeout_s=timeout)
