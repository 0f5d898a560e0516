"""Adapting a deployed model to a site: ``autoseg plan|train DATASET --init model.autoseg``.

A bundle's networks are fine-tuned on a new dataset (another scanner, another hospital) that has the same
channels and classes; each run of the new dataset's own cross-validation starts from one of the bundle's
networks, and the bundle it makes records the one it came from (``fine_tuned_from`` in its manifest and model
card).

**Where the bundle's plans replace the planner's.** Everything the weights depend on is the bundle's: the
axis order, and per configuration the spacing, normalization (with the bundle's CT clip bounds and statistics:
the first layer learned that mapping of intensities, and a few site cases are a poor estimate of new ones),
resampling, network, patch, batch, loss, sampling and augmentation. A planner reading the new fingerprint
would choose another spacing, patch or width: the weights would not load, or would see inputs unlike the ones
they learned. What depends on the new site and this machine is planned here: the folds and which runs train,
the step time (measured on this device for the bundle's network), the precision (fp16 only on CUDA, bf16 only
where the device has it) and the fine-tuning rule below.

**The fine-tuning rule** (numbers in ``plans.json``'s ``finetune.rule``, so a user can read and edit them):

- learning rate: the bundle's times :data:`LR_FACTOR` (SGD 1e-2 -> 1e-3, AdamW 3e-3 -> 3e-4): the weights are
  already near a solution, and a full rate's first steps on a few new cases undo what the bundle learned;
- steps: the fewest of what the run's share of the budget buys on this device, :data:`STEPS_PER_CASE` per
  training case of a fold (at least :data:`MIN_STEPS`: a few cases are learned, then overfitted) and
  :data:`SOURCE_SHARE` of the steps the bundle's own runs were planned with. The run is that many steps, fixed
  (a fine-tune does not stretch to fill a budget);
- folds: every fold of the new split when each run's share of the budget buys :data:`MIN_STEPS`, else fold 0
  (as a small budget trains one fold from scratch);
- run (configuration c, fold k) starts from the bundle's fold ``folds[c][k mod n]``: each bundle network is
  fine-tuned, the first ones again when the new split has more folds than the bundle.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from autoseg.artifacts import atomic_write_bytes
from autoseg.dataset import Dataset
from autoseg.errors import UserError
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Configuration, Plans
from autoseg.workdir import Workdir

logger = logging.getLogger(__name__)

LR_FACTOR = 0.1
STEPS_PER_CASE = 50
MIN_STEPS = 100
SOURCE_SHARE = 0.5
PLANNER_NAME = "finetune"


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_compatible(dataset: Dataset, plans: Plans, source: str) -> None:
    """Refuse (one line naming the dataset and the bundle) a dataset whose channels or classes are not the
    bundle's: its weights read the channels in that order and write those classes."""
    where = f"{dataset.root / 'dataset.json'}"
    mine = [c.lower() for c in dataset.channel_names]
    theirs = [c.lower() for c in plans.channel_names]
    if mine != theirs:
        raise UserError(f"{where}: channels {list(dataset.channel_names)} are not those of {source} "
                        f"({list(plans.channel_names)}); fine-tuning needs the same channels in the same order")
    if dict(dataset.labels) != dict(plans.labels):
        raise UserError(f"{where}: labels {dict(dataset.labels)} are not those of {source} ({dict(plans.labels)}); "
                        "fine-tuning needs the same classes with the same values")
    if plans.regions and list(dataset.regions_class_order or []) != list(plans.regions_class_order):
        raise UserError(f"{where}: regions_class_order {dataset.regions_class_order} is not that of {source} "
                        f"({plans.regions_class_order})")


def check_dimensions(fp: Fingerprint, plans: Plans, source: str) -> None:
    from autoseg.predict_inputs import expected_ndim

    ndim = expected_ndim(plans)
    if ndim is not None and fp.ndim != ndim:
        raise UserError(f"{fp.dataset_name}: its images are {fp.ndim}D and {source} segments {ndim}D images; "
                        "fine-tuning needs images of the same dimensions")


def finetune_steps(budget_steps: int, train_cases: int, source_steps: int) -> int:
    """The rule's step count (see the module docstring)."""
    by_data = max(MIN_STEPS, STEPS_PER_CASE * train_cases)
    return max(1, min(budget_steps, by_data, max(1, int(SOURCE_SHARE * source_steps))))


def provenance(path: Path | str, manifest: dict[str, Any], sha256: str) -> dict[str, Any]:
    """What a fine-tuned bundle records of the one it came from (and, through it, that one's source)."""
    return {"bundle": Path(path).name, "sha256": sha256, "dataset": manifest.get("dataset"),
            "created": manifest.get("created"), "autoseg_version": manifest.get("autoseg_version"),
            "configurations": {c: list(e.get("folds", [])) for c, e in manifest.get("configurations", {}).items()},
            **({"fine_tuned_from": manifest["fine_tuned_from"]} if manifest.get("fine_tuned_from") else {})}


def finetune_plans(bundle: Any, sha256: str, fp: Fingerprint, budget: str | float | None = None,
                   device: str | None = None, folds: int = 5, measurements_dir: Path | None = None,
                   remeasure: bool = False) -> Plans:
    """Plans that fine-tune ``bundle``'s networks (a :class:`~autoseg.bundle.Bundle`) on the dataset of ``fp``:
    the bundle's configurations with this device's step time and the rule's learning rate, steps and runs."""
    from autoseg.device import detect_device
    from autoseg.plan import measurements
    from autoseg.plan.budget import RESERVE_FIXED_S, RESERVE_FRACTION, checkpoint_interval
    from autoseg.plan.make import resolve_budget

    source = bundle.source
    check_dimensions(fp, bundle.plans, source)
    info = detect_device(device)
    budget_s, is_default = resolve_budget(budget, info.type)
    store = measurements.Store(info, measurements_dir, remeasure)
    names = [bundle.configuration] + [c for c in bundle.manifest.get("ensemble", []) if c != bundle.configuration]
    n_folds = min(folds, len(fp.cases))
    train_cases = len(fp.cases) - -(-len(fp.cases) // max(n_folds, 1))  # a fold trains on all but its val share
    train_s = max(budget_s * (1 - RESERVE_FRACTION) - RESERVE_FIXED_S, budget_s * 0.5)
    configs: dict[str, Configuration] = {}
    step_s: dict[str, float] = {}
    notes = [f"fine-tuning {source} ({bundle.manifest.get('dataset')}, {bundle.manifest.get('created')}): "
             f"spacing, normalization, network, patch, batch, loss and augmentation are the bundle's"]
    for c in names:
        cfg = bundle.plans.configurations[c]
        precision = cfg.precision
        if (precision == "fp16" and info.type != "cuda") or (precision == "bf16" and not info.bf16):
            notes.append(f"{c}: {precision} is not available on {info.type}: fine-tuning in fp32")
            precision = "fp32"
        m = measurements.measure(store, cfg.network, bundle.plans.in_channels, bundle.plans.num_classes, cfg.ndim,
                                 cfg.patch_size, cfg.batch_size, info.type, precision, cfg.channels_last)
        step_s[c] = m.step_time_s
        configs[c] = replace(cfg, precision=precision,
                             measured=replace(cfg.measured, step_time_s=round(m.step_time_s, 4),
                                              peak_memory_mb=round(m.peak_memory_bytes / 2**20, 1),
                                              extrapolated=False))
    slowest = max(step_s.values())
    runs_per_fold = len(names)
    all_folds = train_s / (runs_per_fold * n_folds) / slowest >= MIN_STEPS
    trained_folds = n_folds if all_folds else 1
    run_s = train_s / (runs_per_fold * trained_folds)
    start_from: dict[str, list[int]] = {}
    rule: dict[str, Any] = {"lr_factor": LR_FACTOR, "steps_per_case": STEPS_PER_CASE, "min_steps": MIN_STEPS,
                            "source_share": SOURCE_SHARE, "train_cases": train_cases}
    for c in names:
        cfg = configs[c]
        source_steps = bundle.plans.configurations[c].schedule.steps
        steps = finetune_steps(int(run_s / max(step_s[c], 1e-6)), train_cases, source_steps)
        configs[c] = replace(cfg, optimizer=replace(cfg.optimizer, lr=float(f"{cfg.optimizer.lr * LR_FACTOR:.6g}")),
                             schedule=replace(cfg.schedule, steps=steps, val_every=max(10, steps // 5),
                                              checkpoint_every_s=checkpoint_interval(steps * step_s[c])))
        have = sorted(bundle.weights[c])
        start_from[c] = [have[k % len(have)] for k in range(n_folds)]
        notes.append(f"{c}: {steps} steps at lr {configs[c].optimizer.lr:.2g} (the bundle's "
                     f"{cfg.optimizer.lr:.2g} x {LR_FACTOR}; the fewest of the budget's "
                     f"{int(run_s / max(step_s[c], 1e-6))}, {STEPS_PER_CASE} x {train_cases} training cases "
                     f"(at least {MIN_STEPS}) and {SOURCE_SHARE} x the bundle's {source_steps})")
    runs = [{"configuration": c, "fold": k, "seconds": round(run_s, 1)} for c in names for k in range(trained_folds)]
    if not all_folds:
        notes.append(f"budget: fold 0 only (every fold needs {MIN_STEPS} steps per run in the budget)")
    if is_default:
        notes.insert(0, f"budget: default for {info.type} (set --budget)")
    plans = bundle.plans
    return Plans(dataset_name=fp.dataset_name, fingerprint_hash=fp.dataset_hash, planner=PLANNER_NAME,
                 device=info.to_dict(), budget_s=budget_s, configurations=configs, axis_order=list(plans.axis_order),
                 channel_names=list(fp.channel_names), labels=dict(fp.labels),
                 regions_class_order=list(fp.regions_class_order), file_ending=fp.file_ending, folds=folds,
                 train_runs=runs, measurements={"reused": store.hits, "measured": store.misses}, notes=notes,
                 finetune={"source": provenance(source, bundle.manifest, sha256), "start_from": start_from,
                           "rule": rule})


def same_source(plans: Plans, sha256: str) -> bool:
    return plans.finetune.get("source", {}).get("sha256") == sha256


def write_init_weights(work: Workdir, bundle: Any, plans: Plans) -> list[Path]:
    """Copy the bundle's folds that start the plan's runs into the workdir (a checkpoint holding ``model``
    only), so training and its resumption need the workdir alone."""
    import torch

    written = []
    for c, folds in plans.finetune.get("start_from", {}).items():
        for b in sorted(set(folds)):
            buf = io.BytesIO()
            torch.save({"model": {k: v.detach().cpu() for k, v in bundle.weights[c][b].items()}}, buf)
            path = work.init_weights(c, b)
            atomic_write_bytes(buf.getvalue(), path)
            written.append(path)
    return written


def init_weights_for(work: Workdir, plans: Plans, configuration: str, fold: int) -> Path | None:
    """The bundle weights run (configuration, fold) of a fine-tuning plan starts from; None for other plans.
    A fine-tuning plan whose weights are gone from the workdir is a user error, not a silent fresh start."""
    start = plans.finetune.get("start_from", {}).get(configuration)
    if not start:
        return None
    path = work.init_weights(configuration, start[fold % len(start)])
    if not path.is_file():
        src = plans.finetune.get("source", {}).get("bundle", "the bundle")
        raise UserError(f"{path}: missing; run `autoseg plan DATASET --init {src}` again to copy its weights")
    return path


def fixed_steps(plans: Plans, configuration: str) -> int | None:
    """A fine-tuning run's length: the rule's steps, fixed; None (the budget decides) for other plans."""
    if not plans.finetune:
        return None
    return plans.configurations[configuration].schedule.steps
