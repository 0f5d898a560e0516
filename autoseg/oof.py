"""Out-of-fold predictions: after a fold trains, its held-out cases go through the inference engine
(:class:`autoseg.inference.Predictor`, the fold's network alone, no mirroring, no post-processing) from the
preprocessed cache, are written in their original geometry, scored against the raw labels and kept for the
selection and post-processing stages. ``autoseg predict --folds K --mirror off`` of the same image writes
the same label map, voxel for voxel, before post-processing.

``runs/<config>/fold_<k>/validation/``::

    <case>.npz          probabilities (float16, compressed) in the original geometry, (C, *spatial)
    <case><ending>      the label map (argmax, or regions painted), with the original spacing/origin/direction
    instances/<case><ending>
                        instance datasets (the plan has instance classes): the instance map, made by the
                        Predictor's own instance path (detections, interior + watershed, or components), so
                        it equals ``autoseg predict --folds K --mirror off --config C``'s; the selection
                        compares configurations' instances by these (:mod:`autoseg.select`)
    summary.json        Dice per case and class (region datasets: per region), and the mean per class
                        (written last: it marks the validation complete)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from autoseg.artifacts import header, json_safe, write_json
from autoseg.checkpoint import load_checkpoint
from autoseg.dataset import load_dataset
from autoseg.inference import CasePrediction, Predictor
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
    result, geometry = predict_cached_case(predictor, folder, case_id, probabilities, instances=False)
    return result.labels, result.probabilities, geometry


def predict_cached_case(predictor: Predictor, folder: Path, case_id: str, probabilities: bool = False,
                        instances: bool | None = None) -> tuple[CasePrediction, Geometry]:
    """:func:`predict_cached` with the instance map too (``instances`` None: when the plan has instance
    classes), through :meth:`Predictor.predict_preprocessed_case`."""
    data, _, props = load_case(folder, case_id)
    result = predictor.predict_preprocessed_case([(data, props)], probabilities=probabilities, instances=instances,
                                                 case_id=case_id)
    return result, Geometry.from_dict(props["geometry"])


def predict_fold_validation(workdir: Workdir | Path | str, dataset: Path | str, plans: Plans, configuration: str,
                            fold: int, case_ids: list[str], device: str | torch.device | None = None,
                            progress: bool = False, before_write: Callable[[], None] | None = None) -> dict:
    """Predict, write and score the held-out cases of one fold; returns the summary written to disk.
    For a plan with instance classes each case's instance map goes to ``validation/instances/`` too.
    ``before_write`` is called before each case's files and the summary are written (a claim's ``verify``: a
    worker whose run was taken over stops there, so two workers never write one run's validation/)."""
    from tqdm import tqdm

    work = Workdir.of(workdir)
    run = work.run(configuration, fold)
    labels = {c.id: c.label for c in load_dataset(dataset).cases("Tr")}
    predictor = fold_predictor(run, plans, configuration, fold, device)
    run.validation.mkdir(parents=True, exist_ok=True)
    names = plans.scored_classes  # label values, or regions
    per_case = {}
    for cid in tqdm(case_ids, desc=f"validate fold {fold}", unit="case", disable=not progress):
        result, geometry = predict_cached_case(predictor, work.preprocessed(configuration), cid, probabilities=True)
        seg = result.labels
        if before_write is not None:
            before_write()
        predictor.write(seg, result.probabilities, geometry, run.validation, cid, plans.file_ending)
        if result.instances is not None:
            predictor.write_instances(result.instances, geometry, run.oof_instances_dir, cid, plans.file_ending)
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
