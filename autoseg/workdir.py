"""Where a dataset's artifacts live. Paths are arguments; this only supplies the shared default."""

from __future__ import annotations

from pathlib import Path


def default_workdir(dataset_dir: Path | str) -> Path:
    """``./autoseg_work/<dataset folder name>``: the default every command uses, so stages find each other."""
    return Path("autoseg_work") / Path(dataset_dir).resolve().name


def resolve_workdir(dataset_dir: Path | str, workdir: Path | str | None) -> Path:
    return Path(workdir) if workdir is not None else default_workdir(dataset_dir)
