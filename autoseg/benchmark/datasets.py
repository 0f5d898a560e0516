"""A suite's datasets made ready to run: synthetic tasks generated, real-data sets converted, folders checked.

Every dataset ends up as a folder in the nnU-Net v2 layout with held-out ``imagesTs``/``labelsTs``; generated
and converted ones live under ``DIR/data/<name>`` and are reused while their recipe is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from autoseg.benchmark.suite import DatasetSpec
from autoseg.errors import UserError


def prepare_dataset(spec: DatasetSpec, out: Path, cache: Path | None = None) -> tuple[Path, str]:
    """(dataset folder, note for the leaderboard) for one suite dataset; a :class:`UserError` says what failed."""
    if spec.synth:
        from autoseg.synth import TASKS, generate
        from autoseg.synth.core import PROVENANCE_KEY

        folder = out / "data" / spec.name
        n_train = spec.cases or TASKS[spec.synth].cases[spec.size]
        recipe = {"task": spec.synth, "size": spec.size, "seed": spec.seed}
        meta = folder / "dataset.json"
        raw = json.loads(meta.read_text()) if meta.is_file() else {}
        made = raw.get(PROVENANCE_KEY, {})
        if not ({k: made.get(k) for k in recipe} == recipe and raw.get("numTraining") == n_train):
            generate(spec.synth, folder, cases=n_train, size=spec.size, seed=spec.seed)
        return folder, _note(folder)
    if spec.real:
        from autoseg.benchmark.realdata import prepare_real

        folder = prepare_real(spec.real, out / "data" / spec.name, cache or out / "downloads")
        return folder, _note(folder)
    folder = spec.path
    for entry in ("dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        if not (folder / entry).exists():
            raise UserError(f"{folder}: no {entry} (a benchmark dataset needs held-out imagesTs and labelsTs)")
    return folder, _note(folder)


def _note(folder: Path) -> str:
    """What a dataset says about itself for the leaderboard: its note, and the number of cases."""
    raw = json.loads((folder / "dataset.json").read_text())
    n_ts = len({p.name for p in (folder / "labelsTs").iterdir() if not p.name.startswith(".")})
    counts = f"{raw.get('numTraining', '?')} training / {n_ts} test cases"
    note = raw.get("autoseg_benchmark_note")
    return f"{counts}; {note}" if note else counts
