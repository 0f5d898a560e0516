"""Packing a workdir into a bundle: the selected model's plans, post-processing, weights and metrics."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg import __version__
from autoseg.artifacts import dumps_json, header
from autoseg.bundle.archive import FORMAT_VERSION, write_archive
from autoseg.bundle.card import model_card
from autoseg.ensemble import model_name
from autoseg.errors import UserError
from autoseg.plan.model import PLANS_FILE, Plans

BUNDLE_FILE = "model.autoseg"
POSTPROCESSING = "postprocessing.json"
CARD = "README.md"


def weights_member(configuration: str, fold: int) -> str:
    return f"weights/{configuration}/fold_{fold}.safetensors"


def input_contract(plans: Plans) -> dict[str, Any]:
    """What a case must look like: channels in file order, file ending, spatial dimensions, labels."""
    from autoseg.predict_inputs import expected_ndim

    return {"channels": [{"index": i, "name": n, "file": f"CASE_{i:04d}{plans.file_ending}"}
                         for i, n in enumerate(plans.channel_names)],
            "num_channels": plans.in_channels, "file_ending": plans.file_ending, "ndim": expected_ndim(plans),
            "labels": dict(plans.labels)}


def _fold_metrics(workdir: Path, configuration: str, fold: int) -> dict | None:
    from autoseg.train import run_folder

    path = run_folder(workdir, configuration, fold) / "validation" / "summary.json"
    try:
        s = json.loads(path.read_text())
        return {"mean_dice": s["mean_dice"], "foreground_mean_dice": s["foreground_mean_dice"],
                "cases": len(s.get("cases", {}))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _unresolved_ct(plans: Plans) -> list[str]:
    return [name for name, c in plans.configurations.items()
            if any(n.scheme == "ct" and None in (n.clip_low, n.clip_high, n.mean, n.std) for n in c.normalization)]


def pack_bundle(workdir: Path | str, output: Path | str | None = None, configuration: str | None = None) -> Path:
    """Write the trained model of ``workdir`` as one file (default ``WORKDIR/model.autoseg``).

    The model is ``configuration`` alone, else ``selection.json``'s: every configuration of the selected
    ensemble goes in, with all its trained folds and the post-processing rules tuned for the ensemble (and
    for its first configuration alone, for ``autoseg predict --config``).
    ``ct`` normalization statistics are filled from the fingerprint, so the bundle needs nothing else.

    >>> pack_bundle("autoseg_work/Dataset001_CT")                 # doctest: +SKIP
    PosixPath('autoseg_work/Dataset001_CT/model.autoseg')
    """
    from safetensors.torch import save as save_tensors

    from autoseg.checkpoint import FINAL, load_checkpoint
    from autoseg.predict_inputs import (
        SELECTION_FILE,
        choose_configuration,
        trained_folds,
        with_resolved_normalization,
    )
    from autoseg.select import load_postprocessing
    from autoseg.train import run_folder

    workdir = Path(workdir)
    output = Path(output) if output is not None else workdir / BUNDLE_FILE
    plans = with_resolved_normalization(Plans.load(workdir / PLANS_FILE), workdir)
    name = choose_configuration(workdir, plans, configuration)
    selection: dict = {}
    if (workdir / SELECTION_FILE).is_file():
        try:
            selection = json.loads((workdir / SELECTION_FILE).read_text())
        except ValueError as e:
            raise UserError(f"{workdir / SELECTION_FILE}: unreadable ({e}); run `autoseg select` again") from e
    ensemble = selection.get("ensemble") if configuration is None and selection.get("configuration") == name else None
    names = [name] + [c for c in (ensemble or []) if c != name]
    folds = {c: trained_folds(workdir, c) for c in names}  # a member without folds is an error, as in predict
    plans = replace(plans, configurations={c: plans.configurations[c] for c in names},
                    train_runs=[r for r in plans.train_runs if r.get("configuration") in folds])
    unresolved = _unresolved_ct(plans)
    if unresolved:
        raise UserError(f"{workdir / PLANS_FILE}: configuration {unresolved[0]} has ct normalization without its "
                        "statistics and there is no fingerprint.json to fill them; run `autoseg plan` again")

    members: dict[str, bytes] = {PLANS_FILE: dumps_json(plans.to_dict()).encode()}
    rules = {c: load_postprocessing(workdir, c) for c in names}
    if len(names) > 1:
        rules[model_name(names)] = load_postprocessing(workdir, names)
    members[POSTPROCESSING] = dumps_json({**header("postprocessing"), "rules": rules}).encode()
    for c in names:
        for k in folds[c]:
            state = load_checkpoint(run_folder(workdir, c, k) / FINAL)["model"]
            tensors = {key: v.detach().cpu().contiguous().clone() for key, v in state.items()}
            members[weights_member(c, k)] = save_tensors(tensors, metadata={"configuration": c, "fold": str(k)})

    cv = {"selection": {key: selection["cv"][key] for key in selection.get("cv", {})
                        if set(key.split("+")) <= set(names)} if selection else {},
          "folds": {c: {str(k): m for k in folds[c] if (m := _fold_metrics(workdir, c, k)) is not None}
                    for c in names},
          "postprocessed": (selection.get("postprocessing_tuning") or {}).get("foreground_mean_dice_after")
          if ensemble is not None else None}
    manifest = {
        "artifact": "autoseg_bundle", "format_version": FORMAT_VERSION,
        "autoseg_version": __version__, "torch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "python_version": ".".join(map(str, sys.version_info[:3])),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": plans.dataset_name, "input": input_contract(plans),
        "configuration": name, "configurations": {c: {"folds": folds[c]} for c in names},
        "ensemble": names, "postprocessing": rules[model_name(names)], "cv": cv,
    }
    members[CARD] = model_card(manifest, plans).encode()
    return write_archive(members, manifest, output)


def bundle_after_training(workdir: Path | str) -> Path | None:
    """What ``autoseg train`` runs at its end: write ``WORKDIR/model.autoseg``; a failure is reported, not raised."""
    try:
        path = pack_bundle(workdir)
    except UserError as e:
        print(f"autoseg: bundle not written: {e}", file=sys.stderr)
        return None
    print(f"wrote {path} (`autoseg predict {path} INPUT OUTPUT` works anywhere autoseg is installed)")
    return path
