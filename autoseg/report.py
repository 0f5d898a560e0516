"""A single-file HTML report of an evaluation: ``autoseg evaluate --report``.

``report.html`` holds the per-class summary, the per-case table (best case first), the training curves of
a workdir's runs, and overlays of the best, median and worst cases (by mean foreground Dice): the image
(first channel, windowed to its 1st-99th percentile; the reference label map in grey when no image is
found) with the reference and prediction contours of each class. With lesion-wise metrics (see
:mod:`autoseg.evaluate`), a lesion table and, for the same cases, each lesion class's reference and predicted
instances outlined and numbered: matched ones in green, missed reference lesions in yellow ("M"), false
positives in red ("FP"). When the predictions were written by ``autoseg predict`` with a quality flag
(``quality.json`` beside them, :mod:`autoseg.quality`), the case table has each case's score and flag, and a
section says how the flags match the real Dice. Every picture is an embedded PNG, so the file can be mailed or
attached to a ticket as it is; it needs no JavaScript.

>>> result = evaluate_folder("preds/", "labelsTr", output="preds/metrics.json")  # doctest: +SKIP
>>> write_report(result, "preds/", "labelsTr", "preds/report.html", images_dir="imagesTr")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

import numpy as np

from autoseg.artifacts import atomic_write_bytes
from autoseg.io import SUPPORTED_ENDINGS, Geometry, read_image, read_label
from autoseg.lesionwise import SCORES as LESION_SCORES
from autoseg.lesionwise import Matching, case_lesionwise, class_instances
from autoseg.quality import flag_agreement, read_quality
from autoseg.workdir import Workdir

REPORT_FILE = "report.html"
SUMMARY_METRICS = (("dice", "Dice", ".4f"), ("iou", "IoU", ".4f"), ("hd95_mm", "HD95 mm", ".2f"), ("nsd", "NSD", ".4f"))
REF_COLORS = ("lime", "cyan", "yellow", "deepskyblue", "springgreen", "white")
PRED_COLORS = ("red", "magenta", "orange", "hotpink", "coral", "darkviolet")
STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
         "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}th{background:#eee}"
         "td:first-child{text-align:left}img{max-width:100%;border:1px solid #ccc}")


def _num(x: object) -> float:
    """A metric value as float; None (JSON's NaN) and non-numbers as NaN."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _fmt(x: object, fmt: str = ".4f") -> str:
    v = _num(x)
    return "-" if math.isnan(v) else format(v, fmt)


def case_dice(case: dict) -> float:
    """Mean Dice over the classes that have one (NaN when every class is empty in both)."""
    values = [_num(m.get("dice")) for m in case["classes"].values()]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def ranked_cases(metrics: dict) -> list[tuple[str, float]]:
    """(case, mean foreground Dice), best first, cases without a Dice last."""
    scores = [(c, case_dice(r)) for c, r in metrics["cases"].items()]
    return sorted(scores, key=lambda cs: (math.isnan(cs[1]), -cs[1] if not math.isnan(cs[1]) else 0.0, cs[0]))


def pick_cases(metrics: dict) -> list[tuple[str, str, float]]:
    """(role, case, Dice) for the best, median and worst scored cases; fewer when there are fewer cases."""
    scored = [cs for cs in ranked_cases(metrics) if not math.isnan(cs[1])] or ranked_cases(metrics)
    picks = {"best": 0, "median": len(scored) // 2, "worst": len(scored) - 1}
    seen: set[int] = set()
    out = []
    for role, i in picks.items():
        if scored and i not in seen:
            seen.add(i)
            out.append((role, *scored[i]))
    return out


# --- overlays --------------------------------------------------------------------------------------------


def find_image(images_dir: Path | None, case: str, ending: str | None) -> Path | None:
    """The first channel file ``CASE_0000<ending>`` of a case (any supported ending), or None."""
    if images_dir is None or not images_dir.is_dir():
        return None
    for e in ([ending] if ending else []) + [e for e in SUPPORTED_ENDINGS if e != ending]:
        p = images_dir / f"{case}_0000{e}"
        if p.is_file():
            return p
    return None


def _masks(arr: np.ndarray, classes: dict) -> dict[str, np.ndarray]:
    return {name: np.isin(arr, v if isinstance(v, list) else [v]) for name, v in classes.items()}


def _slices(ref_fg: np.ndarray, pred_fg: np.ndarray, n_classes: np.ndarray) -> list[tuple[str, tuple, int, int]]:
    """(label, index, row axis, column axis): the 2D map itself, or for 3D the axial slice with the most
    reference foreground (prediction's if the reference is empty; ties: the most classes present, then the
    middle one) and the coronal slice through its centre."""
    if ref_fg.ndim == 2:
        return [("", (slice(None), slice(None)), 0, 1)]
    fg = ref_fg if ref_fg.any() else pred_fg
    z = ref_fg.shape[0] // 2
    if fg.any():
        counts = fg.sum(axis=(1, 2))
        ties = np.flatnonzero(counts == counts.max())
        ties = ties[n_classes[ties] == n_classes[ties].max()]
        z = int(ties[len(ties) // 2])
    ys = np.nonzero(fg[z])[0]
    y = int(np.median(ys)) if ys.size else ref_fg.shape[1] // 2
    return [(f"axial z={z}", (z, slice(None), slice(None)), 1, 2),
            (f"coronal y={y}", (slice(None), y, slice(None)), 0, 2)]


def overlay_png(ref: np.ndarray, pred: np.ndarray, geometry: Geometry, classes: dict, title: str,
                image: np.ndarray | None = None) -> bytes:
    """PNG bytes: ``image`` (or the reference in grey) with reference (solid) and prediction (dashed)
    contours per class, physical aspect ratio from the spacing, a legend and ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ref_m, pred_m = _masks(ref, classes), _masks(pred, classes)
    any_ref = np.logical_or.reduce(list(ref_m.values())) if ref_m else ref > 0
    any_pred = np.logical_or.reduce(list(pred_m.values())) if pred_m else pred > 0
    if image is not None:
        lo, hi = np.percentile(image, (1, 99))
        background, vmin, vmax = image, float(lo), float(hi) if hi > lo else float(lo) + 1.0
    else:
        # labels in dark to mid grey, so every contour colour stands out
        background, vmin, vmax = ref.astype(np.float32), 0.0, 2.0 * float(max(ref.max(initial=0), 1))
    n_classes = sum((m.any(axis=tuple(range(1, m.ndim))) for m in ref_m.values()), np.zeros(ref.shape[0], int))
    views = _slices(any_ref, any_pred, n_classes)
    fig, axes = plt.subplots(1, len(views), figsize=(5.5 * len(views), 5.2), squeeze=False)
    for ax, (label, index, ra, ca) in zip(axes[0], views):
        sy, sx = geometry.spacing[ra], geometry.spacing[ca]
        bg = background[index]
        h, w = bg.shape
        ax.imshow(bg, cmap="gray", vmin=vmin, vmax=vmax, extent=(0, w * sx, h * sy, 0), interpolation="nearest")
        xs, ys = (np.arange(w) + 0.5) * sx, (np.arange(h) + 0.5) * sy
        for i, name in enumerate(classes):
            for masks, colors, style in ((ref_m, REF_COLORS, "solid"), (pred_m, PRED_COLORS, "dashed")):
                m = masks[name][index]
                if m.any() and not m.all():
                    ax.contour(xs, ys, m.astype(np.float32), levels=[0.5], colors=[colors[i % len(colors)]],
                               linewidths=1.5, linestyles=style)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("mm")
    handles = [Line2D([], [], color=colors[i % len(colors)], ls=style, label=f"{name} {what}")
               for i, name in enumerate(classes)
               for what, colors, style in (("reference", REF_COLORS, "-"), ("prediction", PRED_COLORS, "--"))]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 + 0.035 * (len(handles) // 5), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


MATCHED, MISSED, FALSE = (0.2, 0.9, 0.2, 1.0), (1.0, 0.9, 0.0, 1.0), (1.0, 0.15, 0.15, 1.0)
MAX_NUMBERS = 120  # instance numbers drawn per panel; more would cover the picture


def _outline(ids: np.ndarray) -> np.ndarray:
    """Boundary pixels of every instance of a 2D map (touching instances each keep their own outline)."""
    edge = np.zeros(ids.shape, bool)
    for axis in (0, 1):
        for shift in (1, -1):
            edge |= ids != np.roll(ids, shift, axis=axis)
    return edge & (ids > 0)


def _lesion_view(ref_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[str, tuple, int, int]:
    """The 2D map itself, or for 3D the axial slice holding the most reference and predicted instances."""
    if ref_ids.ndim == 2:
        return "", (slice(None), slice(None)), 0, 1
    both = np.stack([ref_ids, pred_ids])
    counts = [len(np.unique(both[:, z][both[:, z] > 0])) for z in range(ref_ids.shape[0])]
    z = int(np.argmax(counts)) if max(counts, default=0) else ref_ids.shape[0] // 2
    return f"axial z={z}", (z, slice(None), slice(None)), 1, 2


def lesion_overlay_png(ref_ids: np.ndarray, pred_ids: np.ndarray, matching: Matching, geometry: Geometry,
                       title: str, image: np.ndarray | None = None) -> bytes:
    """PNG bytes: reference and predicted instances side by side, outlined and numbered by match status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    label, index, ra, ca = _lesion_view(ref_ids, pred_ids)
    partner = {p: m.ref for m in matching.matches for p in m.preds}
    missed, false = set(matching.missed), set(matching.false_positives)
    bg = (image if image is not None else (ref_ids > 0).astype(np.float32))[index]
    lo, hi = np.percentile(bg, (1, 99)) if bg.size else (0.0, 1.0)
    sy, sx = geometry.spacing[ra], geometry.spacing[ca]
    h, w = bg.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), squeeze=False)
    for ax, ids, side in zip(axes[0], (ref_ids[index], pred_ids[index]), ("reference", "prediction")):
        ax.imshow(bg, cmap="gray", vmin=float(lo), vmax=float(hi) if hi > lo else float(lo) + 1.0,
                  extent=(0, w * sx, h * sy, 0), interpolation="nearest")
        rgba = np.zeros((h, w, 4), np.float32)
        edge = _outline(ids)
        present = [int(i) for i in np.unique(ids[ids > 0])]
        for i in present:
            bad = i in missed if side == "reference" else i in false
            rgba[edge & (ids == i)] = (MISSED if side == "reference" else FALSE) if bad else MATCHED
        ax.imshow(rgba, extent=(0, w * sx, h * sy, 0), interpolation="nearest")
        for i in present[:MAX_NUMBERS]:
            ys, xs = np.nonzero(ids == i)
            if side == "reference":
                text = f"M{i}" if i in missed else str(i)
            else:
                text = "FP" if i in false else str(partner.get(i, i))
            ax.text((xs.mean() + 0.5) * sx, (ys.mean() + 0.5) * sy, text, color="white", fontsize=6,
                    ha="center", va="center", bbox={"boxstyle": "round,pad=0.1", "fc": "black", "alpha": 0.45, "lw": 0})
        ax.set_title(f"{side} instances {label}".strip(), fontsize=9)
        ax.set_xlabel("mm")
    handles = [Line2D([], [], color=MATCHED, label="matched (number: reference lesion)"),
               Line2D([], [], color=MISSED, label="missed reference lesion (M)"),
               Line2D([], [], color=FALSE, label="false positive (FP)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _instances_file(where: object, case: str, ending: str) -> Path | None:
    folder = Path(str(where)) if where else None
    path = folder / f"{case}{ending}" if folder is not None and folder.is_dir() else None
    return path if path is not None and path.is_file() else None


def _lesion_overlays(metrics: dict, case: str, ref: np.ndarray, pred: np.ndarray, geometry: Geometry,
                     image: np.ndarray | None) -> str:
    """One figure per lesion class of a case: its instances outlined, numbered and marked (IoU matching)."""
    setup, ending = metrics.get("lesionwise"), metrics.get("file_ending") or ""
    if not setup:
        return ""
    try:
        paths = [_instances_file(setup.get(k), case, ending) for k in ("prediction_instances", "reference_instances")]
        pred_ids, ref_ids = (read_label(p)[0] if p is not None else None for p in paths)
        matchings = case_lesionwise(ref, pred, setup["classes"], ref_ids, pred_ids, modes=("iou",))
    except Exception as e:  # a report must not fail on one unreadable case
        return f"<p>{html.escape(case)}: no lesion overlay ({html.escape(str(e))})</p>"
    parts = []
    for name, value in setup["classes"].items():
        m = matchings[name]["iou"]
        c = m.counts()
        title = (f"{case} - {name}: {c.n_ref} reference, {c.n_pred} predicted, {c.tp} matched (IoU > 0.5), "
                 f"{c.fn} missed, {c.fp} false positive(s)")
        png = lesion_overlay_png(class_instances(ref, value, ref_ids), class_instances(pred, value, pred_ids), m,
                                 geometry, title, image)
        parts.append(f'<figure><img alt="lesions {html.escape(name)} {html.escape(case)}" src="{_data_uri(png)}">'
                     f"<figcaption>{html.escape(name)} instances</figcaption></figure>")
    return "".join(parts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _case_overlay(metrics: dict, role: str, case: str, dice: float, pred_dir: Path, ref_dir: Path,
                  images_dir: Path | None) -> str:
    """An <figure> for one case, or a line saying why there is none."""
    record, ending = metrics["cases"][case], metrics.get("file_ending") or ""
    pred_path, ref_path = pred_dir / f"{case}{ending}", ref_dir / f"{case}{ending}"
    pred_path = pred_path if pred_path.is_file() else Path(record.get("prediction", pred_path))
    ref_path = ref_path if ref_path.is_file() else Path(record.get("reference", ref_path))
    try:
        ref, geometry = read_label(ref_path)
        pred, _ = read_label(pred_path)
    except Exception as e:  # a report must not fail on one unreadable case
        return f"<p>{html.escape(role)} case {html.escape(case)}: no overlay ({html.escape(str(e))})</p>"
    image, note = None, "reference label map in grey (no image found)"
    image_path = find_image(images_dir, case, ending)
    if image_path is not None:
        try:
            arr, _ = read_image(image_path)
            if arr.shape[1:] == ref.shape:
                image, note = arr[0], f"image {image_path.name}"
            else:
                note = f"{image_path.name} has shape {arr.shape[1:]}, not the label's {ref.shape}; label map shown"
        except Exception as e:
            note = f"{image_path.name} unreadable ({e}); label map shown"
    classes = {n: v for n, v in metrics.get("classes", {}).items()} or {str(v): int(v) for v in np.unique(ref) if v}
    per_class = ", ".join(f"{n} {_fmt(m.get('dice'), '.3f')}" for n, m in record["classes"].items())
    title = f"{role}: {case} - mean Dice {_fmt(dice, '.3f')} ({per_class})"
    png = overlay_png(ref, pred, geometry, classes, title, image)
    return (f'<figure><img alt="{html.escape(role)} {html.escape(case)}" src="{_data_uri(png)}">'
            f"<figcaption>{html.escape(note)}; solid: reference, dashed: prediction</figcaption></figure>"
            + _lesion_overlays(metrics, case, ref, pred, geometry, image))


# --- tables and curves -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def summary_table(metrics: dict) -> str:
    """Per class: mean / median / std of Dice, IoU, HD95 and NSD, and the empty-case counts."""
    header = ["class"] + [f"{label} {s}" for _, label, _ in SUMMARY_METRICS for s in ("mean", "median", "std")]
    header += ["cases", "both empty", "ref empty", "pred empty"]
    s = metrics["summary"]
    rows = []
    for name, e in s["per_class"].items():
        cells = [_fmt(e[m][stat], f) for m, _, f in SUMMARY_METRICS for stat in ("mean", "median", "std")]
        rows.append([name, *cells, str(e["cases"]), str(e["both_empty"]), str(e["ref_empty"]), str(e["pred_empty"])])
    fg = s["foreground_mean"]
    rows.append(["foreground mean"] + [c for m, _, f in SUMMARY_METRICS for c in (_fmt(fg.get(m), f), "", "")]
                + [str(s["cases"])] + [str(s["empty_counts"].get(k, "")) for k in ("both_empty", "ref_empty", "pred_empty")])
    return _table(header, rows)


def lesion_table(metrics: dict) -> str:
    """Per lesion class and matching: pooled counts and scores over all cases, and the case means."""
    setup = metrics.get("lesionwise")
    if not setup:
        return ""
    header = ["class", "matching", "reference", "predicted", "found", "missed", "false"]
    header += [f"{s} pooled" for s in LESION_SCORES] + [f"{s} case mean" for s in ("f1", "lesion_dice", "pq")]
    rows = []
    for name, by_mode in setup["summary"].items():
        for mode, e in by_mode.items():
            p = e["pooled"]
            rows.append([name, mode, *(str(p[k]) for k in ("n_ref", "n_pred", "tp", "fn", "fp")),
                         *(_fmt(p[s]) for s in LESION_SCORES), *(_fmt(e["case_mean"][s]) for s in ("f1", "lesion_dice", "pq"))])
    note = (f"<p>predicted instances: {html.escape(setup['prediction_instances'])}; reference instances: "
            f"{html.escape(setup['reference_instances'])}. IoU matching: one-to-one at IoU &gt; "
            f"{setup['iou_threshold']}; BraTS matching: reference lesions dilated {setup['brats_dilation']} step(s) "
            "match every prediction they touch (no panoptic quality).</p>")
    return note + _table(header, rows)


def case_table(metrics: dict, quality: dict | None = None) -> str:
    """One row per case, best mean foreground Dice first: the mean, then Dice / HD95 / NSD per class (and with
    ``quality``, a prediction run's ``quality.json``: the case's quality score and flag)."""
    names = list(metrics["summary"]["per_class"])
    header = ["case", "mean Dice"] + [f"{n} {label}" for n in names for label in ("Dice", "HD95 mm", "NSD")]
    verdicts = (quality or {}).get("cases", {})
    if quality is not None:
        header += ["quality score", "quality flag"]
    rows = []
    for case, dice in ranked_cases(metrics):
        cls = metrics["cases"][case]["classes"]
        rows.append([case, _fmt(dice)] + [c for n in names for c in (
            _fmt(cls[n].get("dice")), _fmt(cls[n].get("hd95_mm"), ".2f"), _fmt(cls[n].get("nsd")))])
        if quality is not None:
            v = verdicts.get(case)
            rows[-1] += ["-", "-"] if v is None else [_fmt(v["score"], ".3f"),
                                                       "; ".join(v["reasons"]) if v["flagged"] else "ok"]
    return _table(header, rows)


def quality_section(metrics: dict, quality: dict) -> str:
    """How the prediction run's quality flags match the real Dice of these cases."""
    a = flag_agreement(quality, dict(ranked_cases(metrics)))
    rho = "-" if a["spearman_score_dice"] is None else f"{a['spearman_score_dice']:.2f}"
    return (f"<p>threshold {_fmt(quality.get('threshold'), '.3f')} on the score, calibrated on the out-of-fold "
            f"cases for Dice {a['min_dice']:.3f}. Here: {a['flagged']} of {a['cases']} case(s) flagged; "
            f"{a['flagged_below_min_dice']} of the {a['below_min_dice']} below Dice {a['min_dice']:.3f} flagged, "
            f"{a['flagged_above_min_dice']} of the others; Spearman(score, Dice) {rho}.</p>")


def curves_section(workdir: Path) -> str:
    """Each run's training curves (runs/<config>/fold_<k>), the last row of its log, and when each class was
    first learned (time to a validation Dice of 0.5)."""
    from autoseg.trainlog import ONSET_DICE, time_to_dice

    work = Workdir.of(workdir)
    parts = []
    for configuration, fold, run in work.runs():
        name = f"{configuration} fold {fold}"
        line, onset_table = "", ""
        if run.log.is_file():
            with open(run.log, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                last = rows[-1]
                line = (f" - {len(rows)} log rows, last step {last.get('step')}, loss {_fmt(last.get('loss') or None)}"
                        f", validation Dice {last.get('val_dice_mean') or '-'}")
                classes = [k[len("val_dice_"):] for k in last if k.startswith("val_dice_") and k != "val_dice_mean"]
                onsets = time_to_dice(rows, classes)
                onset_table = _table(
                    ["class", f"first step at Dice >= {ONSET_DICE}", "seconds", "share of the run"],
                    [[c, str(o.step) if o.step is not None else "never",
                      f"{o.seconds:.0f}" if o.seconds is not None else "-",
                      f"{o.share:.0%}" if o.share is not None else "-"] for c, o in onsets.items()])
        img = ""
        if run.curves.is_file():
            img = f'<img alt="curves {html.escape(name)}" src="{_data_uri(run.curves.read_bytes())}">'
        parts.append(f"<h3>{html.escape(name)}{html.escape(line)}</h3>{onset_table}{img}")
    return "\n".join(parts) or f"<p>no runs found under {html.escape(str(work.runs_dir))}</p>"


def write_report(metrics: dict, pred_dir: Path | str, ref_dir: Path | str, out_html: Path | str,
                 images_dir: Path | str | None = None, workdir: Path | str | None = None) -> Path:
    """Write a self-contained ``out_html`` for ``metrics`` (from :func:`autoseg.evaluate.evaluate_folder`)."""
    pred_dir, ref_dir, out_html = Path(pred_dir), Path(ref_dir), Path(out_html)
    images = Path(images_dir) if images_dir is not None else None
    parts = [f"<h1>autoseg evaluation: {html.escape(str(pred_dir))}</h1>",
             f"<p>reference: {html.escape(str(ref_dir))}; {metrics['summary']['cases']} cases</p>"]
    if images is not None and not images.is_dir():
        parts.append(f"<p>images folder {html.escape(str(images))} not found: overlays show the label map</p>")
    parts += [f"<p>warning: {html.escape(w)}</p>" for w in metrics.get("warnings", [])]
    parts += ["<h2>Summary per class</h2>", summary_table(metrics)]
    if metrics.get("lesionwise"):
        parts += ["<h2>Lesion-wise</h2>", lesion_table(metrics)]
    parts += ["<h2>Best, median and worst cases</h2>"]
    parts += [_case_overlay(metrics, role, case, d, pred_dir, ref_dir, images) for role, case, d in pick_cases(metrics)]
    if workdir is not None:
        parts += ["<h2>Training curves</h2>", curves_section(Path(workdir))]
    quality = read_quality(pred_dir)
    if quality is not None:
        parts += ["<h2>Quality flag</h2>", quality_section(metrics, quality)]
    parts += ["<h2>Cases (best mean foreground Dice first)</h2>", case_table(metrics, quality)]
    doc = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>autoseg report</title>"
           f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
    atomic_write_bytes(doc.encode("utf-8"), out_html)
    return out_html
