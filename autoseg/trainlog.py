"""What a run records as it goes: ``log.csv`` (append-only) and ``curves.png`` (loss, Dice, learning rate), and
what it tells afterwards: when each class was first learned (:func:`time_to_dice`)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoseg.workdir import RunDir

ONSET_DICE = 0.5  # a class counts as learned from the first validation at which its Dice reaches this


@dataclass(frozen=True)
class Onset:
    """When a class first reached ``ONSET_DICE`` on the validation patches: its step, the run's seconds then and
    the share of the run's steps done; all None when it never did."""

    step: int | None
    seconds: float | None
    share: float | None


def time_to_dice(rows: list[dict[str, str]], classes: list[str], threshold: float = ONSET_DICE,
                 total_steps: int | None = None) -> dict[str, Onset]:
    """Per class, the first logged validation whose Dice is ``threshold`` or more (``rows`` as ``log.csv``
    holds them; ``total_steps`` defaults to the last row's step)."""
    last = total_steps or max((int(r["step"]) for r in rows), default=0)
    onsets = {}
    for name in classes:
        first = next((r for r in rows if (r.get(f"val_dice_{name}") or "") not in ("", "nan")
                      and float(r[f"val_dice_{name}"]) >= threshold), None)
        onsets[name] = Onset(None, None, None) if first is None else Onset(
            int(first["step"]), round(float(first["elapsed_s"]), 1), round(int(first["step"]) / max(last, 1), 3))
    return onsets


class TrainLog:
    """Rows of step, time, lr, loss and per-class validation Dice; tolerant of a resumed run."""

    def __init__(self, run: RunDir, class_names: Mapping[object, str]):
        self.run = run
        self.path = run.log
        self.class_names = class_names
        self.fields = ["step", "elapsed_s", "lr", "loss", "val_dice_mean"] + [
            f"val_dice_{name}" for name in class_names.values()]

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a killed run logged them after its last checkpoint)."""
        rows = [r for r in self.rows() if int(r["step"]) <= step]
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        import io

        from autoseg.artifacts import atomic_write_bytes
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(buf.getvalue().encode(), self.path)

    def append(self, row: dict) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def onsets(self, threshold: float = ONSET_DICE) -> dict[str, Onset]:
        """:func:`time_to_dice` of this run's log, per foreground class."""
        return time_to_dice(self.rows(), list(self.class_names.values()), threshold)

    def plot(self) -> Path:
        """Training loss, validation Dice per class and the learning rate against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        out = self.run.curves
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [int(r["step"]) for r in rows]
        loss = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
        if loss:
            ax1.plot(*zip(*loss), label="train loss", color="tab:blue")
        ax1.set_xlabel("step")
        ax1.set_ylabel("loss")
        lr_ax = ax1.twinx()
        lrs = [float(r["lr"]) for r in rows if r.get("lr")]
        if lrs:
            lr_ax.plot(steps[: len(lrs)], lrs, color="tab:gray", alpha=0.5, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        for name in ["mean", *self.class_names.values()]:
            pts = [(int(r["step"]), float(r[f"val_dice_{name}"])) for r in rows if r.get(f"val_dice_{name}")]
            if pts:
                ax2.plot(*zip(*pts), label=name, lw=2 if name == "mean" else 1, marker="o", ms=3)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation Dice")
        ax2.set_ylim(0, 1)
        if ax2.get_legend_handles_labels()[0]:  # a run stopped before its first validation has none
            ax2.legend(fontsize=8)
        ax1.set_title("training")
        ax2.set_title("validation (patches)")
        fig.tight_layout()
        tmp = out.with_name(".tmp-" + out.name)
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(out)
        return out
