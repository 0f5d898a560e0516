"""Packing a workdir into a bundle: the selected model's plans, post-processing, weights and metrics."""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.artifacts import check_not_inputs, check_writable, dumps_json, header
from autoseg.bundle.archive import FORMAT_VERSION, write_archive
from autoseg.bundle.card import model_card
from autoseg.bundle.layout import CARD, PLANS_MEMBER, POSTPROCESSING, weights_member
from autoseg.errors import UserError
from autoseg.normalize import resolve_plans
from autoseg.postprocess import parse_rules
from autoseg.schema.plans import Plans
from autoseg.schema.selection import Selection, model_name
from autoseg.version import __version__
from autoseg.workdir import RunDir, Workdir

__all__ = ["CARD", "PLANS_MEMBER", "POSTPROCESSING", "input_contract", "pack_bundle", "weights_member"]


def input_contract(plans: Plans) -> dict[str, Any]:
    """What a case must look like: channels in file order, file ending, spatial dimensions, labels (and, for a
    region model, the order its regions paint the label map in)."""
    from autoseg.predict_inputs import expected_ndim

    return {"channels": [{"index": i, "name": n, "file": f"CASE_{i:04d}{plans.file_ending}"}
                         for i, n in enumerate(plans.channel_names)],
            "num_channels": plans.in_channels, "file_ending": plans.file_ending, "ndim": expected_ndim(plans),
            "labels": dict(plans.labels),
            **({"regions_class_order": list(plans.regions_class_order)} if plans.regions else {})}


def _fold_metrics(run: RunDir) -> dict | None:
    s = run.read_validation_summary()
    if s is None:
        return None
    return {"mean_dice": s.get("mean_dice"), "foreground_mean_dice": s.get("foreground_mean_dice"),
            "cases": len(s["cases"])}


def _unresolved_ct(plans: Plans) -> list[str]:
    return [name for name, c in plans.configurations.items()
            if any(n.scheme == "ct" and None in (n.clip_low, n.clip_high, n.mean, n.std) for n in c.normalization)]


def _segment_codes(plans: Plans, selection: Selection | None, selection_file: Path,
                   codes_file: Path | str | None) -> dict[str, dict[str, str]]:
    """The coded segment category and type per class the bundle carries: selection.json's (from dataset.json)
    with ``codes_file``'s replacing them class by class, each checked against the model's classes."""
    from autoseg.dicom.seg import read_segment_codes
    from autoseg.schema.segment_codes import check_codes, codes_to_json, merge_codes, parse_segment_codes

    classes = list(plans.scored_classes.values())
    selected = None
    if selection is not None and selection.segment_codes:
        where = f"{selection_file}: segment_codes"
        selected = parse_segment_codes(selection.segment_codes, where)
        check_codes(selected, classes, where)
    given = read_segment_codes(codes_file) if codes_file is not None else None
    if given is not None:
        check_codes(given, classes, codes_file)
    return codes_to_json(merge_codes(selected, given))


def pack_bundle(workdir: Path | str, output: Path | str | None = None, configuration: str | None = None,
                segment_codes: Path | str | None = None) -> Path:
    """Write the trained model of ``workdir`` as one file (default ``WORKDIR/model.autoseg``).

    The model is ``configuration`` alone, else ``selection.json``'s: every configuration of the selected
    ensemble goes in, with all its trained folds and the post-processing rules tuned for the ensemble (and
    for its first configuration alone, for ``autoseg predict --config``), and the configuration the selection
    chose to make the instances (manifest ``instances_from``) with its folds when it is not a member.
    ``ct`` normalization statistics are filled from the fingerprint, so the bundle needs nothing else.
    The manifest's ``segment_codes`` (coded category and type per class, for DICOM SEG output) are
    selection.json's, from dataset.json, with the file ``segment_codes``'s replacing them class by class.

    >>> pack_bundle("autoseg_work/Dataset001_CT")                 # doctest: +SKIP
    PosixPath('autoseg_work/Dataset001_CT/model.autoseg')
    """
    from safetensors.torch import save as save_tensors

    from autoseg.checkpoint import load_weights

    work = Workdir.of(workdir)
    output = Path(output) if output is not None else work.bundle_file
    check_writable(output, what="bundle")  # before the weights are read
    plans = resolve_plans(work.load_plans(), work.fingerprint_or_none())
    names = work.model(plans, configuration)
    selection = work.load_selection()
    codes = _segment_codes(plans, selection, work.selection_file, segment_codes)  # before the weights are read
    chosen = selection is not None and configuration is None  # the selected model, with its CV scores
    instances_from = work.instance_configuration(plans) if configuration is None else None
    carried = list(dict.fromkeys([*names, *([instances_from] if instances_from else [])]))
    folds = {c: work.trained_folds(c) for c in carried}  # a member without folds is an error, as in predict
    check_not_inputs([output], [work.plans_file, work.fingerprint_file, work.selection_file,
                                *([Path(segment_codes)] if segment_codes is not None else [])]
                     + [work.run(c, k).final for c in carried for k in folds[c]], "give another -o file")
    plans = replace(plans, configurations={c: plans.configurations[c] for c in carried},
                    train_runs=[r for r in plans.train_runs if r.get("configuration") in folds])
    unresolved = _unresolved_ct(plans)
    if unresolved:
        raise UserError(f"{work.plans_file}: configuration {unresolved[0]} has ct normalization without its "
                        f"statistics and there is no {work.fingerprint_file.name} to fill them; run `autoseg plan` again")

    members: dict[str, bytes] = {PLANS_MEMBER: dumps_json(plans.to_dict()).encode()}
    rules = {c: selection.rules_for([c]) if selection else [] for c in names}
    if len(names) > 1:
        rules[model_name(names)] = selection.rules_for(names) if selection else []
    for key in rules:
        parse_rules(rules[key], str(work.selection_file))  # a bundle carries only rules its loader accepts
    members[POSTPROCESSING] = dumps_json({**header("postprocessing"), "rules": rules}).encode()
    for c in carried:
        for k in folds[c]:
            cfg = plans.configurations[c]
            state = load_weights(work.run(c, k).final, cfg.network, plans.in_channels, plans.num_classes, cfg.ndim)
            tensors = {key: v.detach().cpu().contiguous().clone() for key, v in state.items()}
            members[weights_member(c, k)] = save_tensors(tensors, metadata={"configuration": c, "fold": str(k)})

    cv = {"selection": {key: selection.cv[key] for key in selection.cv
                        if set(key.split("+")) <= set(names)} if selection else {},
          "folds": {c: {str(k): m for k in folds[c] if (m := _fold_metrics(work.run(c, k))) is not None}
                    for c in names},
          "postprocessed": (selection.postprocessing_tuning or {}).get("foreground_mean_dice_after")
          if chosen else None}
    manifest = {
        "artifact": "autoseg_bundle", "format_version": FORMAT_VERSION,
        "autoseg_version": __version__, "torch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "python_version": ".".join(map(str, sys.version_info[:3])),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": plans.dataset_name, "input": input_contract(plans),
        "configuration": names[0], "configurations": {c: {"folds": folds[c]} for c in carried},
        "ensemble": names, "postprocessing": rules[model_name(names)], "cv": cv,
        **({"instances_from": instances_from, "instances": selection.instances.to_dict()}
           if instances_from and selection is not None and selection.instances is not None else {}),
        **({"fine_tuned_from": plans.finetune["source"]} if plans.finetune.get("source") else {}),
        **({"segment_codes": codes} if codes else {}),
    }
    if chosen and selection.quality:
        manifest["quality"] = selection.quality  # the quality flag's calibration (autoseg.quality)
    members[CARD] = model_card(manifest, plans).encode()
    return write_archive(members, manifest, output)
