"""The work directory: every path and file name autoseg keeps for one dataset, and the typed readers and
writers of what lives there. No other module spells a workdir path.

    WORKDIR/
      fingerprint.json              Fingerprint (autoseg.fingerprint)
      plans.json                    Plans (autoseg.plan; human-editable)
      splits.json                   the generated cross-validation folds; splits_final.json: the user's
      preprocessed/<config>/        <case>.npy, <case>_seg.npy, <case>.json (autoseg.preprocess)
                                    [<case>_inst.npy: instance datasets]
      runs/<config>/fold_<k>/       checkpoint_latest.pt, checkpoint_final.pt, log.csv, curves.png (autoseg.train)
        validation/                 <case>.npz, <case><ending>, summary.json: out-of-fold outputs (autoseg.oof)
                                    [instances/<case><ending>: instance datasets' instance maps]
      init/<config>/fold_<k>.pt     the weights a fine-tuning run starts from (``--init model.autoseg``)
      search.db                     the search's study (autoseg.search; SQLite by default)
      search/                       trial_<nnnn>/ (a run folder each), trials.csv, history.png, importances.png
      selection.json                Selection (autoseg.select)
      model.autoseg                 the bundle (autoseg.bundle)
      claims/                       who holds what, when several workers share the workdir (autoseg.claims):
        runs/<config>/fold_<k>/     a training run (``autoseg train``)
        locks/preprocess-<config>/  preprocessing a configuration
        locks/select-bundle/        the selection and the bundle
        locks/search-finalize/      writing the search's outcome

Paths are arguments everywhere; ``./autoseg_work/<dataset folder name>`` is only the default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import UserError
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans
from autoseg.schema.selection import Selection

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
SELECTION_FILE = "selection.json"
SPLITS_FILE = "splits.json"
USER_SPLITS_FILE = "splits_final.json"
BUNDLE_FILE = "model.autoseg"
PREPROCESSED_DIR = "preprocessed"
RUNS_DIR = "runs"
SEARCH_DIR = "search"
STUDY_DB_FILE = "search.db"
SEARCH_TABLE, SEARCH_HISTORY, SEARCH_IMPORTANCES = "trials.csv", "history.png", "importances.png"
LATEST, FINAL = "checkpoint_latest.pt", "checkpoint_final.pt"
LOG_FILE, CURVES_FILE = "log.csv", "curves.png"
VALIDATION_DIR, VALIDATION_SUMMARY = "validation", "summary.json"
CLAIMS_DIR, LOCKS_DIR, SELECT_LOCK, PREPROCESS_LOCK = "claims", "locks", "select-bundle", "preprocess-{}"
SEARCH_LOCK = "search-finalize"
INIT_DIR = "init"


def default_workdir(dataset_dir: Path | str) -> Path:
    """``./autoseg_work/<dataset folder name>``: the default every command uses, so stages find each other."""
    return Path("autoseg_work") / Path(dataset_dir).resolve().name


def resolve_workdir(dataset_dir: Path | str, workdir: Path | str | None) -> Path:
    return Path(workdir) if workdir is not None else default_workdir(dataset_dir)


@dataclass(frozen=True)
class RunDir:
    """One training run's folder: a (configuration, fold) under ``runs/``, or a search trial."""

    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def latest(self) -> Path:
        return self.folder / LATEST

    @property
    def final(self) -> Path:
        return self.folder / FINAL

    @property
    def log(self) -> Path:
        return self.folder / LOG_FILE

    @property
    def curves(self) -> Path:
        return self.folder / CURVES_FILE

    @property
    def validation(self) -> Path:
        return self.folder / VALIDATION_DIR

    @property
    def validation_summary(self) -> Path:
        return self.validation / VALIDATION_SUMMARY

    def oof_probabilities(self, case_id: str) -> Path:
        return self.validation / f"{case_id}.npz"

    def oof_labels(self, case_id: str, ending: str) -> Path:
        return self.validation / f"{case_id}{ending}"

    @property
    def oof_instances_dir(self) -> Path:
        """``validation/instances/``: the held-out cases' instance maps (instance datasets; absent in runs
        validated before they were kept). Named as predict's ``OUT/instances/`` (a validation folder is laid
        out as a prediction folder), a word too common elsewhere to be one of this module's reserved names."""
        return self.validation / "instances"

    def oof_instances(self, case_id: str, ending: str) -> Path:
        return self.oof_instances_dir / f"{case_id}{ending}"

    def read_validation_summary(self) -> dict[str, Any] | None:
        """The fold's out-of-fold summary (Dice per case and class), None when its validation has not finished
        (the summary is written last)."""
        path = self.validation_summary
        if not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary, dict) or not isinstance(summary.get("cases"), dict):
                raise ValueError("no 'cases' object")
        except ValueError as e:
            raise UserError(f"{path}: unreadable out-of-fold summary ({e}); delete the fold's validation "
                            "folder and run `autoseg train` again") from e
        return summary

    def oof_cases(self) -> list[str] | None:
        """Cases whose out-of-fold probabilities this fold's validation wrote; None before it finished."""
        summary = self.read_validation_summary()
        return None if summary is None else [c for c in summary["cases"] if self.oof_probabilities(c).is_file()]


@dataclass(frozen=True)
class Workdir:
    """The work directory of one dataset: where each artifact is, and how to read it back."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, where: Workdir | Path | str) -> Workdir:
        return where if isinstance(where, Workdir) else cls(Path(where))

    @classmethod
    def for_dataset(cls, dataset_dir: Path | str, workdir: Workdir | Path | str | None = None) -> Workdir:
        return cls.of(workdir) if workdir is not None else cls(default_workdir(dataset_dir))

    # --- files --------------------------------------------------------------------------------------------
    @property
    def fingerprint_file(self) -> Path:
        return self.root / FINGERPRINT_FILE

    @property
    def plans_file(self) -> Path:
        return self.root / PLANS_FILE

    @property
    def selection_file(self) -> Path:
        return self.root / SELECTION_FILE

    @property
    def splits_file(self) -> Path:
        return self.root / SPLITS_FILE

    @property
    def user_splits_file(self) -> Path:
        return self.root / USER_SPLITS_FILE

    @property
    def bundle_file(self) -> Path:
        return self.root / BUNDLE_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def search_dir(self) -> Path:
        return self.root / SEARCH_DIR

    @property
    def search_table(self) -> Path:
        return self.search_dir / SEARCH_TABLE

    @property
    def search_history(self) -> Path:
        return self.search_dir / SEARCH_HISTORY

    @property
    def search_importances(self) -> Path:
        return self.search_dir / SEARCH_IMPORTANCES

    @property
    def study_db(self) -> Path:
        return self.root / STUDY_DB_FILE

    def preprocessed(self, configuration: str) -> Path:
        return self.root / PREPROCESSED_DIR / configuration

    # --- claims: several workers on one workdir (autoseg.claims) ----------------------------------------------
    @property
    def claims_dir(self) -> Path:
        return self.root / CLAIMS_DIR

    def run_claim(self, configuration: str, fold: int) -> Path:
        """The claim folder of a (configuration, fold) run: the worker that trains it holds it."""
        return self.claims_dir / RUNS_DIR / configuration / f"fold_{fold}"

    def claimed_runs(self) -> list[tuple[str, int]]:
        """(configuration, fold) of every run a worker ever claimed."""
        found = []
        for folder in sorted(p for p in (self.claims_dir / RUNS_DIR).glob("*/fold_*") if p.is_dir()):
            fold = folder.name[len("fold_"):]
            if fold.isdigit():
                found.append((folder.parent.name, int(fold)))
        return found

    def preprocess_lock(self, configuration: str) -> Path:
        return self.claims_dir / LOCKS_DIR / PREPROCESS_LOCK.format(configuration)

    @property
    def select_lock(self) -> Path:
        return self.claims_dir / LOCKS_DIR / SELECT_LOCK

    @property
    def search_lock(self) -> Path:
        """Writing the search's outcome (plans.json, the kept weights, the trial table): one worker at a time."""
        return self.claims_dir / LOCKS_DIR / SEARCH_LOCK

    def init_weights(self, configuration: str, fold: int) -> Path:
        """The weights of a fine-tuned bundle's fold that a fine-tuning run starts from (a checkpoint holding
        only ``model``), copied here so the workdir trains and resumes without the bundle."""
        return self.root / INIT_DIR / configuration / f"fold_{fold}.pt"

    def run(self, configuration: str, fold: int) -> RunDir:
        return RunDir(self.runs_dir / configuration / f"fold_{fold}")

    def trial(self, number: int) -> RunDir:
        """A search trial's run folder (never under ``runs/``)."""
        return RunDir(self.search_dir / f"trial_{number:04d}")

    def runs(self) -> list[tuple[str, int, RunDir]]:
        """Every run folder there is: (configuration, fold, run), sorted."""
        found = []
        for folder in sorted(p for p in self.runs_dir.glob("*/fold_*") if p.is_dir()):
            fold = folder.name[len("fold_"):]
            if fold.isdigit():
                found.append((folder.parent.name, int(fold), RunDir(folder)))
        return found

    # --- typed readers and writers -----------------------------------------------------------------------
    def load_plans(self) -> Plans:
        return Plans.load(self.plans_file)

    def save_plans(self, plans: Plans) -> Path:
        plans.save(self.plans_file)
        return self.plans_file

    def load_fingerprint(self) -> Fingerprint:
        return Fingerprint.load(self.fingerprint_file)

    def fingerprint_or_none(self) -> Fingerprint | None:
        return self.load_fingerprint() if self.fingerprint_file.is_file() else None

    def save_fingerprint(self, fingerprint: Fingerprint) -> Path:
        fingerprint.save(self.fingerprint_file)
        return self.fingerprint_file

    def load_selection(self) -> Selection | None:
        """``selection.json``, or None before the selection stage ran."""
        return Selection.load(self.selection_file) if self.selection_file.is_file() else None

    def save_selection(self, selection: Selection) -> Path:
        selection.save(self.selection_file)
        return self.selection_file

    def cached_cases(self, configuration: str) -> list[str]:
        """The cases preprocessed for ``configuration`` (a case's JSON is written last: its presence means whole,
        unless one of its arrays was deleted since: refused here, naming it, not in a loader's worker)."""
        folder = self.preprocessed(configuration)
        ids = sorted(p.stem for p in folder.glob("*.json"))
        if not ids:
            raise UserError(f"{folder}: no preprocessed cases; run `autoseg plan` first")
        for case_id in ids:
            for array in case_paths(folder, case_id)[:2]:
                if not array.is_file():
                    raise UserError(f"{array}: missing from the preprocessed cache ({case_id}.json is there); run "
                                    "`autoseg plan` again, which preprocesses the case anew")
        return ids

    def is_preprocessed(self, configuration: str) -> bool:
        return any(self.preprocessed(configuration).glob("*.json"))

    def trained_folds(self, configuration: str, folds: Sequence[int] | None = None) -> list[int]:
        """The folds of ``configuration`` with a final checkpoint (those asked for must all have one)."""
        if folds is not None:
            missing = [k for k in folds if not self.run(configuration, k).final.is_file()]
            if missing:
                raise UserError(f"{self.run(configuration, missing[0]).final}: fold {missing[0]} is not trained; "
                                f"train it (`autoseg train --fold {missing[0]}`) or leave it out of --folds")
            return sorted(set(folds))
        found = [k for c, k, run in self.runs() if c == configuration and run.final.is_file()]
        if not found:
            raise UserError(f"{self.runs_dir / configuration}: no trained fold (no fold_*/{FINAL}); "
                            "run `autoseg train` first")
        return found

    def bundle_staleness(self) -> str | None:
        """Why ``model.autoseg`` is not current (missing, older than ``selection.json``, a finished run the
        selection did not score, or one finished again since: ``--extend``), None when it is."""
        if not self.bundle_file.is_file():
            return f"no {BUNDLE_FILE} yet"
        made = self.bundle_file.stat().st_mtime
        selection = self.load_selection()
        if selection is None:
            return f"no {SELECTION_FILE}"
        if self.selection_file.stat().st_mtime > made:
            return f"{SELECTION_FILE} is newer"
        for configuration, fold, run in self.runs():
            if not (run.final.is_file() and run.validation_summary.is_file()):
                continue
            scored = (selection.cv.get(configuration) or {}).get("folds") or []
            if fold not in scored:  # finished while the selection ran, or after
                return f"{configuration} fold {fold} finished and is not in the selection"
            if any(f.stat().st_mtime > made for f in (run.final, run.validation_summary)):
                return f"{configuration} fold {fold} finished after it"
        return None

    def model(self, plans: Plans, configuration: str | None = None) -> list[str]:
        """The configurations ``autoseg predict`` averages, in order: ``configuration`` alone, else the model
        ``selection.json`` chose (one configuration or an ensemble), else the first of the planned runs."""
        if configuration is not None:
            if configuration not in plans.configurations:
                raise UserError(f"--config: configuration '{configuration}' is not in {self.plans_file} "
                                f"(it has {', '.join(plans.configurations)})")
            return [configuration]
        selection = self.load_selection()
        if selection is None:
            runs = [r["configuration"] for r in plans.train_runs if r.get("configuration") in plans.configurations]
            return [runs[0] if runs else next(iter(plans.configurations))]
        missing = [c for c in selection.ensemble if c not in plans.configurations]
        if missing:
            raise UserError(f"{self.selection_file}: configuration '{missing[0]}' is not in {self.plans_file} "
                            f"(it has {', '.join(plans.configurations)}); run `autoseg select` again, or pass --config")
        return list(selection.ensemble)

    def instance_configuration(self, plans: Plans) -> str | None:
        """The configuration ``selection.json`` chose to make the selected model's instances (by out-of-fold
        panoptic quality); None without a choice (no selection, a dataset without instances, older runs)."""
        selection = self.load_selection()
        choice = selection.instances if selection is not None and plans.instance_classes else None
        if choice is None or choice.configuration is None:
            return None
        if choice.configuration not in plans.configurations:
            raise UserError(f"{self.selection_file}: instances.configuration '{choice.configuration}' is not in "
                            f"{self.plans_file} (it has {', '.join(plans.configurations)}); run `autoseg select` "
                            "again, or pass --config")
        return choice.configuration


# --- the preprocessed cache: one case --------------------------------------------------------------------


def case_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    """(data .npy, label .npy, properties .json) of a case in a configuration's cache folder."""
    return folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy", folder / f"{case_id}.json"


def instance_path(folder: Path, case_id: str) -> Path:
    """A cached case's instance map (``<case>_inst.npy``): only datasets with instances have one."""
    return Path(folder) / f"{case_id}_inst.npy"


def load_case(folder: Path | str, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a cached case: data, label map (memory-mapped unless ``mmap`` is False) and properties."""
    data_path, seg_path, json_path = case_paths(Path(folder), case_id)
    mode = "r" if mmap else None
    return (np.load(data_path, mmap_mode=mode), np.load(seg_path, mmap_mode=mode),
            json.loads(json_path.read_text()))
