"""The model card: a short Markdown page in the bundle (``README.md``) saying what the model segments,
what it takes as input and how well it did in cross-validation. Written from the manifest at packing time."""

from __future__ import annotations

from typing import Any

from autoseg.schema.plans import Plans


def _dice(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def _provenance(source: dict[str, Any] | None) -> list[str]:
    """Where a fine-tuned model came from: the bundle it started from, and that one's own source."""
    if not source:
        return []
    lines = ["", "## Provenance", ""]
    while source:
        lines.append(f"- fine-tuned from `{source.get('bundle')}` (sha256 {str(source.get('sha256'))[:16]}..., "
                     f"trained on {source.get('dataset')}, made {source.get('created')} with autoseg "
                     f"{source.get('autoseg_version')})")
        source = source.get("fine_tuned_from")
    return lines


def _segment_codes(codes: dict[str, dict[str, str]] | None) -> list[str]:
    """The coded segment category and type per class a DICOM SEG from this model carries (none: generic)."""
    from autoseg.schema.segment_codes import GENERIC_CATEGORY

    if not codes:
        return []
    lines = ["", "## DICOM segment codes", "",
             "`autoseg predict --output-format seg` codes each segment so (`--segment-codes FILE` overrides a class; "
             "a class not listed gets a generic Tissue code):", "",
             "| class | category | type | coding scheme |", "|---|---|---|---|"]
    for name, entry in codes.items():
        category = str(entry["category"]).split(":", 2) if "category" in entry else list(GENERIC_CATEGORY)
        kind = str(entry["type"]).split(":", 2)
        schemes = " / ".join(dict.fromkeys([category[0], kind[0]]))
        lines.append(f"| {name} | {category[-1]} ({category[1]}) | {kind[-1]} ({kind[1]}) | {schemes} |")
    return lines


def model_card(manifest: dict[str, Any], plans: Plans) -> str:
    from autoseg.postprocess import describe

    contract, name = manifest["input"], manifest["configuration"]
    cfg = plans.configurations[name]
    names = plans.scored_classes  # label values, or regions
    classes = ", ".join(names.values()) or "no foreground class"
    channels = contract["channels"]
    folds = manifest["configurations"][name]["folds"]
    lines = [f"# autoseg model: {manifest['dataset']}", "",
             f"Segments {classes} in {contract['ndim'] or '?'}D images ({contract['file_ending']}, "
             f"{len(channels)} channel{'s' if len(channels) != 1 else ''}).", "",
             "## Input", "",
             f"One file per channel, in this order (a single-channel model also takes `CASE{contract['file_ending']}`):",
             "", "| channel | name | file |", "|---|---|---|"]
    lines += [f"| {c['index']} | {c['name']} | `{c['file']}` |" for c in channels]
    lines += ["", "## Labels", "", "| value | name |", "|---|---|"]
    lines += [f"| {v} | {k} |" for k, v in contract["labels"].items()]
    if plans.regions:
        lines += ["", f"Regions: one sigmoid output per region (a list of values is their union); the label map "
                      f"paints them in regions_class_order {list(plans.regions_class_order)}, later over earlier."]
    rules = manifest["postprocessing"]
    lines += ["", "## Model", "",
              f"- configuration `{name}`: {cfg.network.family}, {cfg.ndim}D, patch "
              f"{'x'.join(map(str, cfg.patch_size))}, spacing {', '.join(f'{s:.3g}' for s in cfg.spacing)} mm",
              f"- folds {', '.join(map(str, folds))} (probabilities averaged)",
              "- post-processing: " + ("; ".join(describe(r, names) for r in rules) if rules else "none")]
    if cfg.network.family == "maskrcnn":
        lines.append("- Mask R-CNN (torchvision, `pip install 'autoseg[instances]'`): the label map from its detections "
                     "painted as class probabilities; the instance map from the folds' detections, mask-voted")
        lines.append("- export: `autoseg export --onnx DIR` writes each fold's detector (boxes, labels, scores, "
                     "masks) with a parity check; TorchScript is not offered (the detections vary in number)")
    if len(manifest.get("ensemble", [])) > 1:
        lines.append(f"- ensemble: {' + '.join(manifest['ensemble'])}, probabilities averaged "
                     f"(`autoseg predict --config {name}` runs the first alone)")
    made_by = manifest.get("instances_from")
    if made_by:
        pq = manifest.get("instances", {}).get("pq", {})
        lines.append(f"- instances: made by `{made_by}` ({plans.configurations[made_by].instances.method}) on the "
                     "label map above, chosen by out-of-fold panoptic quality ("
                     + ", ".join(f"{c} {_dice(v)}" for c, v in pq.items()) + ")")
    lines += ["", "## Cross-validation (out-of-fold Dice)", ""]
    selected = manifest["cv"].get("selection", {}).get(name)
    per_fold = manifest["cv"].get("folds", {}).get(name, {})
    class_names = list(names.values())
    if selected or per_fold:
        lines += ["| | " + " | ".join(class_names) + " | foreground mean | cases |",
                  "|---" * (len(class_names) + 3) + "|"]
        if selected:
            lines.append(f"| folds {','.join(map(str, selected.get('folds', [])))} | "
                         + " | ".join(_dice(selected["mean_dice"].get(n)) for n in class_names)
                         + f" | {_dice(selected.get('foreground_mean_dice'))} | {selected.get('cases', '-')} |")
        for k, m in per_fold.items():
            lines.append(f"| fold {k} | " + " | ".join(_dice(m["mean_dice"].get(n)) for n in class_names)
                         + f" | {_dice(m.get('foreground_mean_dice'))} | {m.get('cases', '-')} |")
        if selected:
            lines.append("")
            after = manifest["cv"].get("postprocessed")
            lines.append("Scores are before post-processing" + (f"; with it the foreground mean is {_dice(after)}."
                                                                 if after is not None else "."))
    else:
        lines.append("No cross-validation results were available when the bundle was made.")
    lines += _segment_codes(manifest.get("segment_codes"))
    lines += _provenance(manifest.get("fine_tuned_from"))
    lines += ["", "## Use", "", "```", "autoseg predict model.autoseg INPUT_DIR OUTPUT_DIR", "```", "",
              f"Made {manifest['created']} with autoseg {manifest['autoseg_version']}, torch "
              f"{manifest['torch_version']}, numpy {manifest['numpy_version']}; bundle format "
              f"{manifest['format_version']}.", ""]
    return "\n".join(lines)
