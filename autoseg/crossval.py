"""Cross-validation splits: k folds, saved in the workdir, overridable by the user.

The file is nnU-Net's ``splits_final.json`` format — a list of ``{"train": [...], "val": [...]}`` — so a
split made for nnU-Net can be dropped in unchanged: put it at ``WORKDIR/splits_final.json`` (or pass it
to ``autoseg train --splits``) and it takes precedence over the generated ``WORKDIR/splits.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoseg.artifacts import write_json
from autoseg.errors import UserError
from autoseg.workdir import Workdir

SPLIT_SEED = 12345


def make_splits(case_ids: list[str], folds: int = 5, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """Shuffled k-fold split of ``case_ids`` (each case validated exactly once)."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise UserError(f"cross-validation needs at least 2 training cases, found {len(ids)}")
    k = min(folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    chunks = np.array_split(order, k)
    return [{"train": sorted(ids[j] for c in chunks[:i] + chunks[i + 1:] for j in c),
             "val": sorted(ids[j] for j in chunks[i])} for i in range(k)]


def _read_user_splits(path: Path, case_ids: set[str]) -> list[dict[str, list[str]]]:
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable splits file ({e})") from e
    if not isinstance(splits, list) or not splits or not all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits):
        raise UserError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}} (nnU-Net splits_final.json)")
    for i, s in enumerate(splits):
        unknown = sorted((set(s["train"]) | set(s["val"])) - case_ids)
        if unknown:
            raise UserError(f"{path}: fold {i} names cases not in the dataset: {', '.join(unknown[:5])}")
        if set(s["train"]) & set(s["val"]):
            raise UserError(f"{path}: fold {i} has cases in both train and val")
    return splits


def load_splits(workdir: Workdir | Path | str, case_ids: list[str], folds: int = 5,
                user_file: Path | str | None = None) -> list[dict[str, list[str]]]:
    """The user's split if given (argument, or ``WORKDIR/splits_final.json``), else the saved generated one,
    else a new one saved to ``WORKDIR/splits.json``."""
    work = Workdir.of(workdir)
    ids = set(case_ids)
    for candidate in ([Path(user_file)] if user_file else []) + [work.user_splits_file]:
        if candidate.is_file():
            return _read_user_splits(candidate, ids)
    if user_file:
        raise UserError(f"{user_file}: splits file not found")
    saved = work.splits_file
    if saved.is_file():
        splits = _read_user_splits(saved, ids)
        if len(splits) == min(folds, len(ids)) and {c for s in splits for c in s["val"]} == ids:
            return splits
    splits = make_splits(case_ids, folds)
    write_json(splits, saved)
    return splits
