"""Score a folder of predictions against a folder of reference label maps: ``autoseg evaluate``.

Files pair by name (``CASE<ending>`` in both folders; the ending comes from dataset.json or is the most
common label-file ending in the reference folder). Each pair must lie on the same grid (shape, spacing,
origin, direction); anything else is an error that names the file, because metrics on misaligned maps
are silently wrong. Every case is scored per class with :func:`autoseg.metrics.compute_metrics` (see
that module for the metrics and the empty-mask conventions), in worker processes, and summarized per
class (mean, median, std over cases with NaN left out, and the counts of empty cases) and over classes
(the foreground mean: the mean of the per-class means).

Lesion-wise metrics (:mod:`autoseg.lesionwise`: detection F1, lesion-wise Dice, panoptic quality, under the
IoU > 0.5 and the BraTS 2023 matching) are added for the lesion classes: dataset.json's ``instance_classes``
and the classes named in ``lesion_classes``. Predicted instances come from ``PRED_DIR/instances/CASE<ending>``
when that folder exists (what ``autoseg predict`` writes for an instance model), else from the connected
components of each class; reference instances from the reference folder's sibling ``instancesTr``/
``instancesTs`` (``labelsTr`` -> ``instancesTr``) or ``ref_instances`` when present, else from components.

>>> result = evaluate_folder("preds/", "Dataset001/labelsTr", "Dataset001/dataset.json", jobs=4)  # doctest: +SKIP
>>> write_metrics(result, "preds/metrics.json")  # also writes preds/metrics.csv              # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from autoseg.artifacts import (
    atomic_write_bytes,
    check_not_inputs,
    check_writable,
    header,
    json_safe,
    write_json,
)
from autoseg.errors import UserError
from autoseg.io import SUPPORTED_ENDINGS, file_ending, read_label
from autoseg.lesionwise import BRATS_DILATION, IOU_THRESHOLD, MODES, case_lesionwise
from autoseg.lesionwise import summarize as summarize_lesions
from autoseg.metrics import (
    COUNTS,
    SCORES,
    VOLUMES,
    Tolerance,
    compute_metrics,
    empty_class_metrics,
    resolve_tolerances,
)

METRICS_FILE = "metrics.json"
PRED_INSTANCES = "instances"  # PRED_DIR/instances/CASE<ending>: the instance maps of an instance model
LESION_COLUMNS = {  # metrics.csv column -> (matching, lesion-wise metric); empty for a class that is no lesion class
    "lesion_n_ref": ("iou", "n_ref"), "lesion_n_pred": ("iou", "n_pred"), "lesion_tp": ("iou", "tp"),
    "lesion_fp": ("iou", "fp"), "lesion_fn": ("iou", "fn"), "lesion_precision": ("iou", "precision"),
    "lesion_recall": ("iou", "recall"), "lesion_f1": ("iou", "f1"), "lesion_dice": ("iou", "lesion_dice"),
    "pq": ("iou", "pq"), "sq": ("iou", "sq"), "rq": ("iou", "rq"),
    "brats_tp": ("brats", "tp"), "brats_fp": ("brats", "fp"), "brats_fn": ("brats", "fn"),
    "brats_f1": ("brats", "f1"), "brats_lesion_dice": ("brats", "lesion_dice"),
}
CSV_COLUMNS = ("case", "class", *SCORES, "nsd_tolerance_mm", *VOLUMES, *COUNTS, "empty", *LESION_COLUMNS)
EMPTY_KINDS = {"both": "both_empty", "ref": "ref_empty", "pred": "pred_empty"}


# --- inputs ----------------------------------------------------------------------------------------------


def read_dataset_json(path: Path | str) -> tuple[dict[str, int | list[int]], int | None, str | None]:
    """(foreground classes name -> value(s), ignore label, file ending) from a dataset.json (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from e
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, dict):
        raise UserError(f"{path}: needs a 'labels' object like {{\"background\": 0, \"liver\": 1}}")
    classes: dict[str, int | list[int]] = {}
    for name, v in labels.items():
        ok = _is_int(v) or (isinstance(v, list) and v and all(map(_is_int, v)))
        if not ok:
            raise UserError(f"{path}: label '{name}' must be an integer or a list of integers, got {v!r}")
        if name != "ignore" and v != 0 and v != [0]:
            classes[name] = v
    ignore = labels.get("ignore")
    ending = raw.get("file_ending")
    if ending is not None and str(ending).lower() not in SUPPORTED_ENDINGS:
        raise UserError(f"{path}: 'file_ending' {ending!r} is not supported (use one of {', '.join(SUPPORTED_ENDINGS)})")
    return classes, ignore if _is_int(ignore) else None, ending


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _label_files(folder: Path, ending: str) -> dict[str, Path]:
    """Case name -> file for the files of ``folder`` with ``ending`` (hidden files, e.g. our temporaries, skipped)."""
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(ending.lower())}


def detect_ending(folder: Path) -> str:
    """The most common supported file ending among the files of ``folder``."""
    counts = Counter(file_ending(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = [(n, e) for e, n in counts.items() if e in SUPPORTED_ENDINGS]
    if not found:
        raise UserError(f"{folder}: no label files found (supported endings: {', '.join(SUPPORTED_ENDINGS)})")
    return max(found)[1]


def pair_cases(pred_dir: Path, ref_dir: Path, ending: str) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Case -> (prediction, reference), and the predictions that have no reference. A reference without its
    prediction is an error naming every such file: scoring a subset would silently flatter the mean."""
    refs, preds = _label_files(ref_dir, ending), _label_files(pred_dir, ending)
    if not refs:
        raise UserError(f"{ref_dir}: no reference files ending in {ending}")
    missing = [c for c in refs if c not in preds]
    if missing:
        raise UserError("\n".join(f"{pred_dir / (c + ending)}: prediction missing for reference case '{c}' "
                                  f"({refs[c]})" for c in missing))
    return {c: (preds[c], refs[c]) for c in refs}, sorted(c for c in preds if c not in refs)


# --- one case (runs in a worker) -------------------------------------------------------------------------


def _found_values(arr: np.ndarray) -> set[int]:
    if arr.dtype.itemsize <= 2:
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel()))}
    return {int(v) for v in np.unique(arr)}


def evaluate_case(task: tuple) -> dict:
    """Read and score one (case, prediction, reference, classes or None, tolerance, ignore) task."""
    case, pred_path, ref_path, classes, tolerance, ignore = task[:6]
    lesions = task[6] if len(task) > 6 else None
    declared = None if classes is None else (
        {0, *([ignore] if ignore is not None else [])}
        | {v for c in classes.values() for v in (c if isinstance(c, list) else [c])})
    ref, ref_geom = read_label(ref_path)
    pred, pred_geom = read_label(pred_path)
    if pred.shape != ref.shape:
        raise UserError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} {ref.shape}; "
                        "predictions must lie on the reference's grid")
    mismatch = pred_geom.mismatch(ref_geom)
    if mismatch:
        raise UserError(f"{pred_path}: {mismatch} (prediction vs reference {ref_path}); "
                        "predictions must lie on the reference's grid")
    if classes is None:  # no dataset.json: the values found here; the caller fills in the other cases' values
        classes = {str(v): v for v in sorted((_found_values(ref) | _found_values(pred)) - {0})}
        if isinstance(tolerance, Mapping):
            tolerance = {k: t for k, t in tolerance.items() if k in classes or k == "default"}
    n_scored = ref.size - (int(np.count_nonzero(ref == ignore)) if ignore is not None else 0)
    result = {"case": case, "prediction": str(pred_path), "reference": str(ref_path),
              "spacing": list(ref_geom.spacing), "scored_voxels": n_scored,
              "classes": compute_metrics(pred, ref, classes, ref_geom.spacing, tolerance, ignore)}
    if lesions:
        result["lesionwise"] = _case_lesions(lesions, pred, ref, pred_path, ref_path, ref_geom)
    if declared is not None:  # values dataset.json does not name score in no class: say so
        result["undeclared"] = {str(path): found for path, arr in ((pred_path, pred), (ref_path, ref))
                                if (found := sorted(_found_values(arr) - declared))}
    return result


def _read_instances(path: Path | None, label: np.ndarray, label_path: Path, geometry) -> np.ndarray | None:
    """An instance map that must lie on its label map's grid (None: use connected components)."""
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"{path}: instance map missing for {label_path} (its folder holds the instance maps of "
                        "the other cases)")
    ids, geom = read_label(path)
    if ids.shape != label.shape or geom.mismatch(geometry):
        raise UserError(f"{path}: instance map not on the grid of {label_path} "
                        f"({geom.mismatch(geometry) or f'shape {ids.shape} vs {label.shape}'})")
    return ids


def _case_lesions(lesions: dict, pred: np.ndarray, ref: np.ndarray, pred_path: Path, ref_path: Path,
                  geometry) -> dict:
    """Class -> matching -> lesion-wise counts and scores of one case."""
    pred_ids = _read_instances(lesions["pred_instances"], pred, pred_path, geometry)
    ref_ids = _read_instances(lesions["ref_instances"], ref, ref_path, geometry)
    matchings = case_lesionwise(ref, pred, lesions["classes"], ref_ids, pred_ids, lesions["modes"],
                                lesions["dilation"])
    return {name: {mode: m.counts().as_dict() for mode, m in by_mode.items()} for name, by_mode in matchings.items()}


def reference_instances_dir(ref_dir: Path) -> Path | None:
    """``labelsTr`` -> its sibling ``instancesTr`` (``labelsTs`` -> ``instancesTs``) when that folder exists."""
    if not ref_dir.name.startswith("labels"):
        return None
    sibling = ref_dir.parent / ("instances" + ref_dir.name[len("labels"):])
    return sibling if sibling.is_dir() else None


def lesion_classes_of(dataset_json: Path | str | None, classes: Mapping[str, int | list[int]] | None,
                      named: Sequence[str] = ()) -> dict[str, int | list[int]]:
    """The lesion classes: dataset.json's ``instance_classes`` and the ``named`` ones (class names, or label
    values without a dataset.json), name -> value(s)."""
    out: dict[str, int | list[int]] = {}
    if dataset_json is not None:
        from autoseg.schema.instances import instance_classes
        path = Path(dataset_json)
        raw = json.loads((path / "dataset.json" if path.is_dir() else path).read_text())
        out.update({name: value for value, name in instance_classes(raw).items()})
    for name in named:
        if classes is not None:
            if name not in classes:
                raise UserError(f"--lesion-classes: '{name}' is not a class of {dataset_json} "
                                f"(classes: {', '.join(classes)})")
            out[name] = classes[name]
        elif name.isdigit() and int(name) > 0:
            out[name] = int(name)
        else:
            raise UserError(f"--lesion-classes: '{name}': without --dataset-json name classes by their label "
                            "value (e.g. 2)")
    return out


def _lesion_setup(pred_dir: Path, ref_dir: Path, lesion_classes: dict, ref_instances: Path | None,
                  modes: Sequence[str], dilation: int) -> dict | None:
    if not lesion_classes:
        return None
    if dilation < 0:
        raise UserError(f"--brats-dilation must be 0 or more, got {dilation}")
    if ref_instances is not None and not Path(ref_instances).is_dir():
        raise UserError(f"{ref_instances}: reference instance folder not found")
    pred_inst = pred_dir / PRED_INSTANCES
    return {"classes": lesion_classes, "modes": tuple(modes), "dilation": int(dilation),
            "pred_dir": pred_inst if pred_inst.is_dir() else None,
            "ref_dir": Path(ref_instances) if ref_instances is not None else reference_instances_dir(ref_dir)}


def _lesion_task(setup: dict | None, case: str, ending: str) -> dict | None:
    if setup is None:
        return None
    return {"classes": setup["classes"], "modes": setup["modes"], "dilation": setup["dilation"],
            "pred_instances": setup["pred_dir"] / f"{case}{ending}" if setup["pred_dir"] else None,
            "ref_instances": setup["ref_dir"] / f"{case}{ending}" if setup["ref_dir"] else None}


def _lesion_record(setup: dict, cases: Mapping[str, dict]) -> dict:
    """What metrics.json says about the lesion-wise metrics: their set-up and the summary per class and matching."""
    summary = {name: {mode: summarize_lesions([c["lesionwise"][name][mode] for c in cases.values()], mode)
                      for mode in setup["modes"]} for name in setup["classes"]}
    source = "connected components of each class"
    return {"classes": setup["classes"], "modes": list(setup["modes"]), "iou_threshold": IOU_THRESHOLD,
            "brats_dilation": setup["dilation"],
            "prediction_instances": str(setup["pred_dir"]) if setup["pred_dir"] else source,
            "reference_instances": str(setup["ref_dir"]) if setup["ref_dir"] else source,
            "summary": summary}


# --- the folder ------------------------------------------------------------------------------------------


def evaluate_folder(pred_dir: Path | str, ref_dir: Path | str, dataset_json: Path | str | None = None,
                    nsd_tolerance: Tolerance = None, jobs: int | None = None, progress: bool = False,
                    output: Path | str | None = None, also_writing: Sequence[Path | str] = (),
                    lesion_classes: Sequence[str] = (), ref_instances: Path | str | None = None,
                    lesion_modes: Sequence[str] = MODES, brats_dilation: int = BRATS_DILATION) -> dict:
    """Score every reference case against the prediction of the same name; return (and with ``output``,
    write) the metrics: ``{"classes", "cases": {case: {"classes": {name: metrics}}}, "summary", ...}``.
    ``output`` and the CSV beside it, and ``also_writing`` (files the caller writes afterwards: the report),
    are checked before any case is read: each must be writable and none may be one of the label files or
    dataset.json.

    Classes are dataset.json's foreground labels by name (region labels score the union of their
    values; the ignore label is left out of every metric), else the union of the values found in all
    files, named by value. ``nsd_tolerance`` is mm for all classes or ``{name: mm, "default": mm}``;
    unset, each case uses its largest voxel spacing (recorded per case and class).

    Lesion classes (dataset.json's ``instance_classes`` and ``lesion_classes``) also get lesion-wise metrics,
    per case under ``cases[case]["lesionwise"]`` and summarized under ``"lesionwise"`` (see the module).
    """
    from autoseg.fingerprint import map_cases  # the project's worker pool (ordered, fails fast, progress bar)

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    classes, ignore, ending = read_dataset_json(dataset_json) if dataset_json is not None else (None, None, None)
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise UserError(f"{folder}: {what} folder not found")
    ending = ending or detect_ending(ref_dir)
    pairs, extra = pair_cases(pred_dir, ref_dir, ending)
    if output is not None or also_writing:
        _check_outputs(pred_dir, ref_dir, ending, dataset_json, output, also_writing)
    warnings = []
    if extra:
        warnings.append(f"{len(extra)} prediction(s) in {pred_dir} without a reference were not scored: "
                        + ", ".join(extra[:10]) + (", ..." if len(extra) > 10 else ""))
    if classes is not None:
        _check_tolerance(nsd_tolerance, list(classes))
    elif isinstance(nsd_tolerance, Mapping):
        bad = [k for k in nsd_tolerance if k != "default" and not k.isdigit()]
        if bad:
            raise UserError(f"NSD tolerance for unknown class '{bad[0]}': without --dataset-json classes are "
                            "named by their label value (e.g. 1=2.0)")
    lesions = _lesion_setup(pred_dir, ref_dir, lesion_classes_of(dataset_json, classes, lesion_classes),
                            Path(ref_instances) if ref_instances is not None else None, lesion_modes, brats_dilation)
    tasks = [(c, p, r, classes, nsd_tolerance, ignore, _lesion_task(lesions, c, ending)) for c, (p, r) in pairs.items()]
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    results = map_cases(evaluate_case, tasks, jobs, progress=progress, desc="evaluate")
    names = list(classes) if classes is not None else _fill_found_classes(results, nsd_tolerance, warnings)
    for r in results:
        for path, values in r.pop("undeclared", {}).items():
            warnings.append(f"{path}: label value(s) {', '.join(map(str, values))} not in {dataset_json}; "
                            "those voxels count as background in every class")
    cases = {r.pop("case"): r for r in results}
    result = {**header("metrics"), "prediction_dir": str(pred_dir), "reference_dir": str(ref_dir),
              "dataset_json": None if dataset_json is None else str(dataset_json), "file_ending": ending,
              "classes": classes if classes is not None else {n: int(n) for n in names}, "ignore_label": ignore,
              "nsd_tolerance_mm": _tolerance_record(nsd_tolerance),
              "summary": summarize(cases, names), "cases": cases,
              "extra_predictions": extra, "warnings": warnings}
    if lesions is not None:
        result["lesionwise"] = _lesion_record(lesions, cases)
    if output is not None:
        write_metrics(result, output)
    return result


def _check_outputs(pred_dir: Path, ref_dir: Path, ending: str, dataset_json: Path | str | None,
                   output: Path | str | None, also_writing: Sequence[Path | str]) -> None:
    outputs = [Path(output), Path(output).with_suffix(".csv")] if output is not None else []
    outputs += map(Path, also_writing)
    for path in outputs:
        check_writable(path, what="metrics" if path.suffix in (".json", ".csv") else "report")
    inputs = [*_label_files(pred_dir, ending).values(), *_label_files(ref_dir, ending).values()]
    check_not_inputs(outputs, inputs + ([Path(dataset_json)] if dataset_json is not None else []),
                     "give another -o file")


def _check_tolerance(nsd_tolerance: Tolerance, names: list[str]) -> None:
    try:
        resolve_tolerances(nsd_tolerance, names, (1.0,))
    except ValueError as e:
        raise UserError(str(e)) from e


def _tolerance_record(nsd_tolerance: Tolerance) -> object:
    if nsd_tolerance is None:
        return "largest voxel spacing of each case"
    return dict(nsd_tolerance) if isinstance(nsd_tolerance, Mapping) else float(nsd_tolerance)


def _fill_found_classes(results: list[dict], nsd_tolerance: Tolerance, warnings: list[str]) -> list[str]:
    """Without dataset.json, give every case every value found anywhere (absent there: both empty)."""
    values = sorted({int(n) for r in results for n in r["classes"]})
    names = [str(v) for v in values]
    if isinstance(nsd_tolerance, Mapping):
        unknown = sorted(set(nsd_tolerance) - set(names) - {"default"})
        if unknown:
            warnings.append(f"NSD tolerance given for class(es) {', '.join(unknown)} found in no file")
        nsd_tolerance = {k: t for k, t in nsd_tolerance.items() if k not in unknown}
    for r in results:
        tolerances = resolve_tolerances(nsd_tolerance, names, r["spacing"])
        r["classes"] = {n: r["classes"].get(n) or empty_class_metrics(r["scored_voxels"], r["spacing"], tolerances[n])
                        for n in names}
    return names


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not v.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}


def summarize(cases: Mapping[str, dict], names: list[str]) -> dict:
    """Per class: mean / median / std (population) over cases of each metric with NaN left out, its number
    of values, and how many cases had an empty reference and/or prediction; then the foreground mean."""
    per_class = {}
    for name in names:
        rows = [c["classes"][name] for c in cases.values()]
        entry: dict = {m: _stats([r[m] for r in rows]) for m in (*SCORES, *VOLUMES)}
        entry["cases"] = len(rows)
        entry.update({key: sum(r["empty"] == kind for r in rows) for kind, key in EMPTY_KINDS.items()})
        per_class[name] = entry
    foreground = {}
    for m in SCORES:
        means = [per_class[n][m]["mean"] for n in names if per_class[n][m]["mean"] is not None]
        foreground[m] = float(np.mean(means)) if means else None
    totals = {key: sum(per_class[n][key] for n in names) for key in EMPTY_KINDS.values()}
    return {"per_class": per_class, "foreground_mean": foreground, "cases": len(cases), "empty_counts": totals}


# --- output ----------------------------------------------------------------------------------------------


def metrics_rows(result: dict) -> list[dict]:
    """One row per case and class, the columns of ``CSV_COLUMNS``."""
    rows = []
    for case, c in result["cases"].items():
        lesions = c.get("lesionwise", {})
        for name, m in c["classes"].items():
            row = {"case": case, "class": name, **{k: m[k] for k in CSV_COLUMNS[2:] if k not in LESION_COLUMNS}}
            by_mode = lesions.get(name, {})
            row.update({col: by_mode[mode][key] if mode in by_mode else "" for col, (mode, key) in LESION_COLUMNS.items()})
            rows.append(row)
    return rows


def write_metrics(result: dict, path: Path | str) -> tuple[Path, Path]:
    """Write ``path`` (JSON; NaN as null) and the CSV beside it (NaN as "nan"), each atomically."""
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics_rows(result))
    atomic_write_bytes(buf.getvalue().encode(), csv_path)
    write_json(json_safe(result), path)
    return path, csv_path


def summary_lines(result: dict) -> list[str]:
    """A short human-readable table: per class mean Dice, HD95, NSD and empty-case counts."""
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    s = result["summary"]
    lines = [f"{'class':<20} {'Dice':>6} {'IoU':>6} {'HD95mm':>8} {'NSD':>6}  empty(both/ref/pred)"]
    for name, e in s["per_class"].items():
        lines.append(f"{name[:20]:<20} {f(e['dice']['mean'], '.4f'):>6} {f(e['iou']['mean'], '.4f'):>6} "
                     f"{f(e['hd95_mm']['mean'], '.2f'):>8} {f(e['nsd']['mean'], '.4f'):>6}  "
                     f"{e['both_empty']}/{e['ref_empty']}/{e['pred_empty']}")
    fg = s["foreground_mean"]
    lines.append(f"{'foreground mean':<20} {f(fg['dice'], '.4f'):>6} {f(fg['iou'], '.4f'):>6} "
                 f"{f(fg['hd95_mm'], '.2f'):>8} {f(fg['nsd'], '.4f'):>6}  ({s['cases']} cases)")
    lesions = result.get("lesionwise")
    if lesions:
        lines.append(f"{'lesion-wise (pooled)':<20} {'match':>6} {'ref':>5} {'found':>5} {'false':>5} "
                     f"{'F1':>6} {'lesDice':>7} {'PQ':>6}")
        for name, by_mode in lesions["summary"].items():
            for mode, e in by_mode.items():
                p = e["pooled"]
                lines.append(f"{name[:20]:<20} {mode:>6} {p['n_ref']:>5} {p['tp']:>5} {p['fp']:>5} "
                             f"{f(p['f1'], '.4f'):>6} {f(p['lesion_dice'], '.4f'):>7} {f(p['pq'], '.4f'):>6}")
    return lines


def parse_tolerance(text: str | None) -> Tolerance:
    """``"2"`` (mm, every class) or ``"liver=2,tumour=1"``, optionally with a bare number as the default."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.rpartition("=")
        try:
            out[name.strip() or "default"] = float(value)
        except ValueError:
            raise UserError(f"--nsd-tolerance: '{item}' is not MM or NAME=MM (e.g. 2 or liver=2,tumour=1)") from None
    if not out:
        raise UserError("--nsd-tolerance: give MM or NAME=MM,... (e.g. 2 or liver=2,tumour=1)")
    bad = [k for k, v in out.items() if not (v > 0 and math.isfinite(v))]
    if bad:
        raise UserError(f"--nsd-tolerance: {bad[0]}: the tolerance must be a positive number of mm")
    return out["default"] if list(out) == ["default"] else out
