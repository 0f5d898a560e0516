"""Out-of-fold predictions: after a fold trains, its held-out cases go through the inference engine
(:class:`autoseg.inference.Predictor`, the fold's network alone, no mirroring, no post-processing) from the
preprocessed cache, are written in their original geometry, scored against the raw labels and kept for the
selection and post-processing stages. ``autoseg predict --folds K --mirror off`` of the same image writes
the same label map, voxel for voxel, before post-processing.

``runs/<config>/fold_<k>/validation/``::

    <case>.npz          probabilities (float16, compressed) in the original geometry, (C, *spatial)
    <case><ending>      the label map (argmax, or regions painted), with the original spacing/origin/direction
    summary.json        Dice per case and class (region datasets: per region), and the mean per class
                        (written last)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from autoseg.artifacts import header, json_safe, write_json
from autoseg.checkpoint import load_checkpoint
from autoseg.dataset import load_dataset
from autoseg.inference import Predictor
from autoseg.io import Geometry, read_label
from autoseg.metrics import dice_per_class
from autoseg.schema.plans import Plans
from autoseg.workdir import RunDir, Workdir, load_case


def fold_predictor(run: RunDir, plans: Plans, configuration: str, fold: int,
                   device: str | torch.device | None = None) -> Predictor:
    """The engine for one trained fold as validation runs it: that fold's network alone, no test-time
    mirroring, no post-processing (the rules are tuned on these outputs)."""
    weights = [load_checkpoint(run.final)["model"]]
    return Predictor(plans, configuration, weights, device, folds=[fold], mirror="off")


def predict_cached(predictor: Predictor, folder: Path, case_id: str, probabilities: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Predict a case of the preprocessed cache ``folder`` (its configuration's): label map and maps in the
    original geometry, and that geometry."""
    data, _, props = load_case(folder, case_id)
    seg, maps = predictor.predict_preprocessed([(data, props)], probabilities=probabilities)
    return seg, maps, Geometry.from_dict(props["geometry"])


def predict_fold_validation(workdir: Workdir | Path | str, dataset: Path | str, plans: Plans, configuration: str,
                            fold: int, case_ids: list[str], device: str | torch.device | None = None,
                            progress: bool = False, before_write: Callable[[], None] | None = None) -> dict:
    """Predict, write and score the held-out cases of one fold; returns the summary written to disk.
    ``before_write`` is called before each file is written (a claim's ``verify``: a worker whose run was taken
    over stops there, so two workers never write one run's validation/)."""
    from tqdm import tqdm

    work = Workdir.of(workdir)
    run = work.run(configuration, fold)
    labels = {c.id: c.label for c in load_dataset(dataset).cases("Tr")}
    predictor = fold_predictor(run, plans, configuration, fold, device)
    run.validation.mkdir(parents=True, exist_ok=True)
    names = plans.scored_classes  # label values, or regions
    per_case = {}
    for cid in tqdm(case_ids, desc=f"validate fold {fold}", unit="case", disable=not progress):
        seg, maps, geometry = predict_cached(predictor, work.preprocessed(configuration), cid, probabilities=True)
        if before_write is not None:
            before_write()
        predictor.write(seg, maps, geometry, run.validation, cid, plans.file_ending)
        ref, _ = read_label(labels[cid])
        per_case[cid] = {names[c]: d for c, d in dice_per_class(seg, ref, list(names), plans.ignore_label).items()}
    means = {name: _nanmean([s[name] for s in per_case.values()]) for name in names.values()}
    if before_write is not None:
        before_write()
    summary = {**header("oof_summary"), "configuration": configuration, "fold": fold,
               "mean_dice": means, "foreground_mean_dice": _nanmean(list(means.values())), "cases": per_case}
    write_json(json_safe(summary), run.validation_summary)
    return summary


def _nanmean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else None
