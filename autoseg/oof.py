"""Out-of-fold predictions: after a fold trains, its held-out cases are predicted on full images
(sliding window), brought back to their original geometry, scored against the raw labels and stored for
the selection and post-processing stages.

``runs/<config>/fold_<k>/validation/``::

    <case>.npz          probabilities (float16, compressed) in the original geometry, (C, *spatial)
    <case><ending>      the argmax label map, written with the original spacing/origin/direction
    summary.json        Dice per case and class, and the mean per class
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from autoseg.artifacts import atomic_write_bytes, header, write_json
from autoseg.checkpoint import FINAL, load_checkpoint
from autoseg.dataset import load_dataset
from autoseg.io import Geometry, read_label, write_label
from autoseg.metrics import dice_per_class
from autoseg.nets import build_network
from autoseg.plan.model import Plans
from autoseg.preprocess import PREPROCESSED_DIR, load_case, restore_to_original
from autoseg.sliding_window import sliding_window

VALIDATION_DIR = "validation"


def load_run_model(folder: Path, plans: Plans, configuration: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    cfg = plans.configurations[configuration]
    model = build_network(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim)
    model.load_state_dict(load_checkpoint(folder / FINAL)["model"])
    return model.to(device).eval()


def _save_npz(path: Path, probabilities: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=probabilities.astype(np.float16))
    atomic_write_bytes(buf.getvalue(), path)


def predict_fold_validation(workdir: Path | str, dataset: Path | str, plans: Plans, configuration: str,
                            fold: int, case_ids: list[str], folder: Path, device: str | torch.device = "cpu",
                            progress: bool = False) -> dict:
    """Predict, export and score the held-out cases of one fold; returns the summary written to disk."""
    from tqdm import tqdm

    cfg = plans.configurations[configuration]
    ds = load_dataset(dataset)
    labels = {c.id: c.label for c in ds.cases("Tr")}
    model = load_run_model(folder, plans, configuration, device)
    out = folder / VALIDATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(plans.class_names)
    per_case = {}
    for cid in tqdm(case_ids, desc=f"validate fold {fold}", unit="case", disable=not progress):
        data, _, props = load_case(Path(workdir) / PREPROCESSED_DIR / configuration, cid)
        probs = sliding_window(model, data, cfg.patch_size, plans.num_classes, cfg.ndim, device, overlap=0.5,
                               mirror_axes=(), precision=cfg.precision, channels_last=cfg.channels_last).numpy()
        probs = restore_to_original(probs, props, cfg, is_label=False)
        seg = probs.argmax(0).astype(np.uint8 if plans.num_classes < 256 else np.uint16)
        _save_npz(out / f"{cid}.npz", probs)
        write_label(seg, Geometry.from_dict(props["geometry"]), out / f"{cid}{plans.file_ending}")
        ref, _ = read_label(labels[cid])
        per_case[cid] = {plans.class_names[c]: d for c, d in dice_per_class(seg, ref, classes, plans.ignore_label).items()}
    means = {name: _nanmean([s[name] for s in per_case.values()]) for name in plans.class_names.values()}
    summary = {**header("oof_summary"), "configuration": configuration, "fold": fold,
               "mean_dice": means, "foreground_mean_dice": _nanmean(list(means.values())), "cases": per_case}
    write_json(_json_safe(summary), out / "summary.json")
    return summary


def _nanmean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else None


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and np.isnan(obj):
        return None
    return obj
