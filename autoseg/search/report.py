"""What a search leaves to read: ``search/trials.csv`` (one row per trial), ``search/history.png`` (Dice per
trial and the best so far, the rules' point marked) and ``search/importances.png`` (which parameters
mattered, Optuna's PED-ANOVA; drawn once two trials have completed). The study itself stays readable by
``optuna-dashboard`` from its storage (``optuna-dashboard sqlite:///WORKDIR/search.db``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoseg.artifacts import atomic_write_bytes
from autoseg.workdir import Workdir

PARAMS = ("family", "depth", "width", "patch", "loss", "lr", "augmentation", "batch", "mirror")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain row per trial: number, state, Dice, parameters, and what was measured."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        state = t.state.name.lower()
        if a.get("rejected"):
            state = "rejected"
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        # a pruned trial's value is its last patch Dice, not the scored Dice of a finished one: shown in the note
        final = t.state == TrialState.COMPLETE and t.value is not None
        row = {"trial": t.number, "state": state, "rules": bool(a.get("rules")),
               "dice": round(t.value, 4) if final else None}
        row.update({k: t.params.get(k) for k in PARAMS})
        row.update({"parameters": a.get("parameters"), "step_time_s": a.get("step_time_s"),
                    "peak_memory_mb": a.get("peak_memory_mb"), "steps": a.get("steps"),
                    "duration_s": None if duration is None else round(duration, 1),
                    "note": "; ".join(n for n in (_move(t), a.get("rejected") or _pruned_note(t)) if n)})
        if isinstance(row["lr"], float):
            row["lr"] = float(f"{row['lr']:.4g}")
        rows.append(row)
    return rows


def _move(t: FrozenTrial) -> str:
    return f"single change: {t.user_attrs['neighbour']}" if "neighbour" in t.user_attrs else ""


def _pruned_note(t: FrozenTrial) -> str:
    if t.state != TrialState.PRUNED or not t.intermediate_values:
        return ""
    step = max(t.intermediate_values)
    return f"{t.user_attrs.get('pruned_at', 'pruned')} (patch Dice {t.intermediate_values[step]:.3f})"


def describe_trial(t: FrozenTrial) -> str:
    """One line: the trial's choices and its outcome."""
    p, a = t.params, t.user_attrs
    what = (f"{p.get('family')} depth{p.get('depth', 0):+d} width x{p.get('width')} patch {p.get('patch')} "
            f"{p.get('loss')} lr {p.get('lr', 0):.3g} aug {p.get('augmentation')} batch {p.get('batch')}"
            + ("" if p.get("mirror", True) else " no mirroring"))
    tag = " (rules)" if a.get("rules") else f" ({a['neighbour']})" if "neighbour" in a else ""
    if a.get("rejected"):
        outcome = f"rejected: {a['rejected']}"
    elif t.state == TrialState.PRUNED:
        outcome = f"pruned at {a.get('pruned_at', 'a validation')}"
    elif t.state == TrialState.COMPLETE:
        outcome = f"Dice {t.value:.4f} after {a.get('steps', '?')} steps"
    else:
        outcome = t.state.name.lower()
    return f"trial {t.number}{tag}: {what} -> {outcome}"


def write_outputs(study: optuna.Study, work: Workdir) -> list[Path]:
    """The trial table, the history plot and (with two or more completed trials) the importances plot in the
    workdir's search folder."""
    work.search_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_bytes(buf.getvalue().encode(), work.search_table)
    out = [work.search_table, _history(rows, work.search_history)]
    importances = _importances(study, work.search_importances)
    return out + ([importances] if importances else [])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return path


def _history(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    done = [r for r in rows if r["dice"] is not None and math.isfinite(r["dice"])]
    ax.scatter([r["trial"] for r in done], [r["dice"] for r in done], s=22, label="completed trial")
    pruned = [r["trial"] for r in rows if r["state"] == "pruned"]
    if pruned:
        ax.scatter(pruned, [0.0] * len(pruned), marker="x", color="grey", s=18, label="pruned (no final Dice)")
    rules = [r for r in done if r["rules"]]
    if rules:
        ax.axhline(rules[0]["dice"], color="tab:orange", lw=1, ls="--", label="rules' point")
    best, xs, ys = -math.inf, [], []
    for r in sorted(done, key=lambda r: r["trial"]):
        best = max(best, r["dice"])
        xs.append(r["trial"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation Dice (fold 0)")
    ax.set_title("search: optimization history")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _importances(study: optuna.Study, path: Path) -> Path | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        path.unlink(missing_ok=True)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError):  # too few distinct trials for the evaluator
        values = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    if values:
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax.text(0.5, 0.5, "not enough varied trials to rank the parameters", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"search: parameter importances ({len(complete)} completed trials)")
    fig.tight_layout()
    return _save(fig, path)
