"""One cell of the leaderboard: one method on one dataset, end to end, each stage a measured process tree.

An autoseg cell runs the CLI as a user would, each stage its own process (so its wall time, CPU time and
peak memory are its own, pool workers included):

    autoseg plan DATASET -w WORK --budget B --device D -j J [--planner P] [--folds F] [--search]
    autoseg train DATASET -w WORK --fold 0 --budget B --device D [--config C]
    autoseg predict WORK DATASET/imagesTs PREDICTIONS --device D
    autoseg evaluate PREDICTIONS DATASET/labelsTs --dataset-json DATASET/dataset.json -o CELL/metrics.json

A command cell runs its command (one measured stage, ``run``; the command may report its own stages in a
JSON file at ``{timings}``: ``{"stages": {"plan": {"wall_s": ...}, ...}}``), then the same ``autoseg
evaluate``. The cell's record goes to ``DIR/cells/<dataset>__<method>.json``; its logs to
``DIR/work/<dataset>__<method>/logs/``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from autoseg.benchmark.measure import Measurement, measure
from autoseg.benchmark.suite import DatasetSpec, MethodSpec, Suite

DONE, FAILED, SKIPPED = "done", "failed", "skipped"
STAGE_FIELDS = ("wall_s", "cpu_s", "peak_pss_mb", "peak_rss_mb", "processes", "returncode")
EXTRA_TIMEOUT_S = 1800.0  # a stage may run this much longer than the budget before it is killed
POLL_S = 0.5
"""How often a stage's process tree is sampled: reading /proc for a large multi-threaded tree every 50 ms took a
third of a core on a 2-core machine (measured on an nnU-Net training run), which the measured cell then lacks.
Peaks per process are exact regardless (the kernel's VmHWM); only the PSS sum is sampled."""


class CellFailed(Exception):
    """A stage of a cell failed; the message is the one-line reason recorded in the cell."""


def cell_id(dataset: DatasetSpec, method: MethodSpec) -> str:
    return f"{dataset.name}__{method.name}"


def cell_file(out: Path, dataset: DatasetSpec, method: MethodSpec) -> Path:
    return out / "cells" / f"{cell_id(dataset, method)}.json"


def signature(suite: Suite, dataset: DatasetSpec, method: MethodSpec) -> dict:
    """What a cell's result depends on: a finished cell is reused only while this is unchanged."""
    d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(dataset).items()}
    m = {k: [str(p) for p in v] if k == "requires" else v for k, v in asdict(method).items()}
    return {"dataset": d, "method": m, "budget_s": suite.budget_of(method), "device": suite.device}


def autoseg_bin() -> list[str]:
    """The ``autoseg`` command of this interpreter (the console script beside it, else ``-m autoseg``)."""
    script = Path(sys.executable).with_name("autoseg")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "autoseg"]


def _stage_record(m: Measurement) -> dict:
    return {k: round(getattr(m, k), 3) if isinstance(getattr(m, k), float) else getattr(m, k) for k in STAGE_FIELDS}


def _tail(log: Path, lines: int = 400) -> str:
    """The last error-looking line of a log, for a one-line reason."""
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    text = [t.strip() for t in text if t.strip() and "%|" not in t]
    for t in reversed(text):
        if "error" in t.lower() or "exception" in t.lower():
            return t[:300]
    return text[-1][:300] if text else ""


class CellRunner:
    """Runs the stages of one cell, recording each; raises :class:`CellFailed` at the first failure."""

    def __init__(self, suite: Suite, dataset: DatasetSpec, method: MethodSpec, data: Path, out: Path,
                 progress: bool = True, lesion_classes: list[str] | None = None):
        self.suite, self.dataset, self.method, self.data = suite, dataset, method, data
        self.lesion_classes = lesion_classes or []
        self.work = out / "work" / cell_id(dataset, method)
        self.logs = self.work / "logs"
        self.predictions = self.work / "predictions"
        self.metrics_file = out / "cells" / f"{cell_id(dataset, method)}.metrics.json"
        self.stages: dict[str, dict] = {}
        self.progress = progress
        self.budget_s = suite.budget_of(method)
        self.timeout_s = method.timeout_s or (self.budget_s + EXTRA_TIMEOUT_S)

    def stage(self, name: str, cmd: list[str], cwd: Path | None = None) -> None:
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
        # the environment is this process's: `autoseg benchmark` set OMP_WAIT_POLICY=PASSIVE for every stage
        m = measure(cmd, cwd=cwd, log=log, timeout=self.timeout_s, append=True, interval=POLL_S)
        self.stages[name] = _stage_record(m)
        if self.progress:
            print(f"    {name}: {m.wall_s:.0f}s, peak {m.peak_pss_mb:.0f} MB"
                  + ("" if m.returncode == 0 else f", exit code {m.returncode}"), file=sys.stderr, flush=True)
        if m.returncode == -9 and m.wall_s >= self.timeout_s:
            raise CellFailed(f"{name} killed after {self.timeout_s:.0f}s (timeout); log {log}")
        if m.returncode != 0:
            raise CellFailed(f"{name} exited with code {m.returncode}: {_tail(log) or 'no output'}; log {log}")

    def run(self) -> dict:
        shutil.rmtree(self.work, ignore_errors=True)
        self.logs.mkdir(parents=True)
        extra: dict = {}
        if self.method.kind == "autoseg":
            self._autoseg()
        else:
            extra = self._command()
        self.stage("evaluate", [*autoseg_bin(), "-q", "evaluate", str(self.predictions), str(self.data / "labelsTs"),
                                "--dataset-json", str(self.data / "dataset.json"), "-o", str(self.metrics_file),
                                "-j", str(self.suite.jobs)]
                   + (["--lesion-classes", ",".join(self.lesion_classes)] if self.lesion_classes else []))
        if self.method.kind == "autoseg":
            extra["onsets"] = training_onsets(self.work / "autoseg")
        return {"stages": self.stages, "metrics": summarize_metrics(json.loads(self.metrics_file.read_text())),
                **extra}

    def _autoseg(self) -> None:
        m, d, w = self.method, str(self.data), str(self.work / "autoseg")
        budget = f"{self.budget_s:g}s"
        n_train = len(json_cases(self.data / "labelsTr"))
        plan = [*autoseg_bin(), "-q", "plan", d, "-w", w, "--budget", budget, "--device", self.suite.device,
                "-j", str(self.suite.jobs), "--planner", m.planner, "--folds", str(max(2, min(m.folds, n_train)))]
        if m.search:
            plan.append("--search")
        self.stage("plan", plan)
        train = [*autoseg_bin(), "-q", "train", d, "-w", w, "--fold", "0", "--budget", budget,
                 "--device", self.suite.device]
        if m.configuration:
            train += ["--config", m.configuration]
        self.stage("train", train)
        self.stage("predict", [*autoseg_bin(), "-q", "predict", w, str(self.data / "imagesTs"), str(self.predictions),
                               "--device", self.suite.device])

    def _command(self) -> dict:
        timings = self.work / "timings.json"
        fields = {"python": sys.executable, "dataset": self.data, "images_ts": self.data / "imagesTs",
                  "predictions": self.predictions, "budget_s": f"{self.budget_s:g}", "work": self.work / "run",
                  "timings": timings, "jobs": self.suite.jobs, "device": self.suite.device,
                  "suite_dir": self.suite.folder}
        cmd = shlex.split(self.method.command.format(**{k: str(v) for k, v in fields.items()}))
        self.stage("run", cmd, cwd=self.suite.folder)
        if not self.predictions.is_dir():
            raise CellFailed(f"the command wrote no {self.predictions}; log {self.logs / 'run.log'}")
        if timings.is_file():
            try:
                reported = json.loads(timings.read_text())
            except json.JSONDecodeError:
                return {}
            return {"reported": reported}
        return {}


def json_cases(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def summarize_metrics(result: dict) -> dict:
    """The leaderboard's part of ``autoseg evaluate``'s result: Dice, NSD and HD95 per class and foreground, and
    per class the Dice over the test cases whose reference holds the class (a lesion class absent from some
    cases is judged where it is there to find)."""
    keys = ("dice", "nsd", "hd95_mm")
    s = result["summary"]
    per_class = {name: {k: e[k]["mean"] for k in keys} for name, e in s["per_class"].items()}
    for name, entry in per_class.items():
        present = [c["classes"][name]["dice"] for c in result.get("cases", {}).values()
                   if (c.get("classes", {}).get(name, {}).get("volume_ref_mm3") or 0) > 0]
        entry["dice_present"] = sum(present) / len(present) if present else None
        entry["cases_present"] = len(present)
    out = {"per_class": per_class, "foreground": {k: s["foreground_mean"].get(k) for k in keys},
           "cases": s["cases"], "nsd_tolerance_mm": result.get("nsd_tolerance_mm")}
    summary = (result.get("lesionwise") or {}).get("summary", {})  # pooled: every test-case lesion weighs the same
    out["lesions"] = {name: _lesion_entry(by_mode) for name, by_mode in summary.items()}
    return out


def _lesion_entry(by_mode: dict) -> dict:
    """The leaderboard's lesion-wise numbers of one class: BraTS lesion-wise Dice and F1, IoU F1 and PQ."""
    brats, iou = (by_mode.get(m, {}).get("pooled", {}) for m in ("brats", "iou"))
    return {"lesion_dice": brats.get("lesion_dice"), "brats_f1": brats.get("f1"), "f1": iou.get("f1"),
            "pq": iou.get("pq"), "n_ref": iou.get("n_ref")}


def lesion_classes_of(data: Path, jobs: int = 1) -> list[str]:
    """The classes the leaderboard scores lesion by lesion: dataset.json's ``instance_classes`` and the classes
    the fingerprint calls small (:func:`autoseg.plan.rules.small_classes`, a median object under 1 % of the
    median image rather than of a plan's patch, so every method of a dataset is scored on the same classes)."""
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.plan.rules import small_classes
    from autoseg.schema.instances import instance_classes

    raw = json.loads((data / "dataset.json").read_text())
    names = list(instance_classes(raw).values())
    fp = extract_fingerprint(data, jobs=jobs)
    names += [n for n in small_classes(fp, fp.median_shape, fp.median_spacing) if n not in names]
    return names


def rescore_lesions(record: dict, out: Path, dataset: DatasetSpec, method: MethodSpec, data: Path,
                    lesion_classes: list[str], jobs: int = 1) -> bool:
    """Add lesion-wise metrics to a finished cell from its stored predictions (no retraining): evaluate them
    again with the lesion classes and rewrite the cell's metrics and record. False when nothing was stored."""
    from autoseg.errors import UserError
    from autoseg.evaluate import evaluate_folder

    predictions = out / "work" / cell_id(dataset, method) / "predictions"
    metrics = record.get("metrics") or {}
    if "lesions" in metrics or not predictions.is_dir():
        return False
    if lesion_classes:
        metrics_file = out / "cells" / f"{cell_id(dataset, method)}.metrics.json"
        try:
            result = evaluate_folder(predictions, data / "labelsTs", data / "dataset.json", jobs=jobs,
                                     output=metrics_file, lesion_classes=lesion_classes)
        except UserError:  # the stored predictions no longer match the data: leave the cell as it was
            return False
        record["metrics"] = summarize_metrics(result)
    else:
        metrics["lesions"] = {}  # scored, and no class to score lesion by lesion
    write_record(cell_file(out, dataset, method), record)
    return bool(lesion_classes)


def training_onsets(work: Path) -> dict[str, dict]:
    """When each class was first learned in an autoseg workdir's fold-0 run (:func:`autoseg.trainlog.time_to_dice`)."""
    import csv
    from dataclasses import asdict

    from autoseg.trainlog import time_to_dice
    from autoseg.workdir import Workdir

    runs = [run for _, fold, run in Workdir(work).runs() if fold == 0 and run.log.is_file()]
    if not runs:
        return {}
    with open(runs[0].log, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[len("val_dice_"):] for k in (rows[0] if rows else {}) if k.startswith("val_dice_")
               and k != "val_dice_mean"]
    return {c: {**asdict(o), "steps": int(rows[-1]["step"])} for c, o in time_to_dice(rows, classes).items()}


def skip_reason(method: MethodSpec) -> str | None:
    """Why a method cannot run on this machine (a required path is missing)."""
    for path in method.requires:
        if not path.exists():
            return f"requires {path}, which is missing"
    return None


def run_cell(suite: Suite, dataset: DatasetSpec, method: MethodSpec, data: Path | None, out: Path,
             note: str = "", data_error: str | None = None, progress: bool = True,
             lesion_classes: list[str] | None = None) -> dict:
    """Run one cell and write its record; a failure is recorded (status, one-line reason, log) and returned."""
    record = {"dataset": dataset.name, "method": method.name, "signature": signature(suite, dataset, method),
              "dataset_source": dataset.source, "method_description": method.describe(), "note": note,
              "budget_s": suite.budget_of(method), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_before": round(os.getloadavg()[0], 2)}
    t0 = time.perf_counter()
    runner = None
    reason = skip_reason(method)
    if reason:
        record.update(status=SKIPPED, reason=reason)
    elif data_error:
        record.update(status=FAILED, reason=data_error)
    else:
        runner = CellRunner(suite, dataset, method, data, out, progress, lesion_classes)
        try:
            record.update(status=DONE, **runner.run())
        except CellFailed as e:
            record.update(status=FAILED, reason=str(e), stages=runner.stages)
        except Exception as e:  # noqa: BLE001  (a bug in one cell must not stop the others)
            record.update(status=FAILED, reason=f"{type(e).__name__}: {e}", stages=runner.stages)
        record["log_dir"] = str(runner.logs)
    record["total_s"] = round(time.perf_counter() - t0, 1)
    write_record(cell_file(out, dataset, method), record)
    return record


def write_record(path: Path, record: dict) -> None:
    from autoseg.artifacts import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, path)


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(path: Path, sig: dict) -> dict | None:
    """The record at ``path`` if that cell is done with the same signature (so a re-run skips it)."""
    record = load_record(path)
    if record and record.get("status") == DONE and record.get("signature") == json.loads(json.dumps(sig)):
        return record
    return None
