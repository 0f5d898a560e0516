"""What a run records as it goes: ``log.csv`` (append-only) and ``curves.png`` (loss, Dice, learning rate)."""

from __future__ import annotations

import csv
from pathlib import Path

from autoseg.workdir import RunDir


class TrainLog:
    """Rows of step, time, lr, loss and per-class validation Dice; tolerant of a resumed run."""

    def __init__(self, run: RunDir, class_names: dict[int, str]):
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
