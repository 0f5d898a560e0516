"""nnU-Net v2 on one benchmark dataset, at a wall-clock training budget: the `command` method of the suites.

    python benchmarks/nnunet_runner.py --dataset DIR --output PRED_DIR --budget-s 900 --work WORK \
        [--timings FILE] [--jobs 2] [--device cpu] [--configuration auto]

1. lays the dataset out in nnU-Net's raw layout (symlinks; benchmarks/_nnunet.Workspace under ``WORK``);
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (``2d`` for 2D data);
3. trains fold 0 with ``nnUNetTrainer_Budget`` (installed into the nnU-Net venv's trainer folder at run time,
   since nnU-Net finds trainers by scanning its own package): nnU-Net's trainer with short epochs (25
   iterations, 5 validation iterations) whose number is re-fitted after every epoch to the measured pace so
   that the poly learning-rate schedule ends with the budget, and which stops when the budget is spent. The
   budget counts from the first training iteration (after nnU-Net's data loader set-up), as autoseg's does;
   the final checkpoint is saved as usual and nnU-Net's own validation of fold 0 follows;
4. ``nnUNetv2_predict -f 0 -chk checkpoint_final.pth`` on ``DIR/imagesTs`` into ``PRED_DIR`` (nnU-Net's
   defaults otherwise, test-time mirroring included).

With fewer than 5 training cases nnU-Net cannot make its 5-fold split, so a split with the same seed over
as many folds as there are cases is written first. Each stage's wall time, CPU time and peak memory (its
process tree) go to ``--timings`` as ``{"stages": {"plan": {...}, "train": {...}, "predict": {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nnunet  # noqa: E402

from autoseg.benchmark.cells import POLL_S  # noqa: E402
from autoseg.benchmark.measure import measure  # noqa: E402

DATASET_ID = 990
TRAINER = "nnUNetTrainer_Budget"
TRAINER_CODE = '''"""Written by autoseg's benchmarks/nnunet_runner.py: nnU-Net's trainer inside a wall-clock budget."""
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Budget(nnUNetTrainer):
    """Short epochs; their number re-fitted to the measured pace after each one (so the poly schedule ends
    with the budget); training stops when ``NNUNET_BUDGET_S`` seconds of it are spent."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("NNUNET_BUDGET_S", "900"))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_ITERATIONS_PER_EPOCH", "25"))
        self.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_VAL_ITERATIONS_PER_EPOCH", "5"))
        self.num_epochs = 10000

    def run_training(self):
        self.on_train_start()
        start, first = time.perf_counter(), self.current_epoch
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                if time.perf_counter() - start >= self.budget_s:
                    break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            elapsed = time.perf_counter() - start
            per_epoch = elapsed / (epoch + 1 - first)
            self.num_epochs = max(epoch + 1, epoch + 1 + int((self.budget_s - elapsed) / per_epoch))
            self.lr_scheduler.max_steps = self.num_epochs
            self.print_to_log_file(f"budget: {elapsed:.0f}s of {self.budget_s:.0f}s spent, "
                                   f"{self.num_epochs} epochs in all at this pace")
            self.on_epoch_end()
            if elapsed >= self.budget_s or self.current_epoch >= self.num_epochs:
                break
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped when ``NNUNET_SKIP_VALIDATION=1``: the benchmark scores held-out test cases itself, and
        nnU-Net's full-image validation of the fold takes minutes on a CPU without changing the weights."""
        if os.environ.get("NNUNET_SKIP_VALIDATION") == "1":
            self.print_to_log_file("final validation skipped (NNUNET_SKIP_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)
'''


def install_trainer(venv: Path = _nnunet.VENV) -> Path:
    """Write the trainer into the nnU-Net venv's trainer folder (nnU-Net finds trainers there by name)."""
    (folder,) = venv.glob("lib/python*/site-packages/nnunetv2/training/nnUNetTrainer/variants/training_length")
    path = folder / f"{TRAINER}.py"
    if not path.is_file() or path.read_text() != TRAINER_CODE:
        path.write_text(TRAINER_CODE)
    return path


def is_2d(dataset: Path) -> bool:
    """Whether the dataset's images are 2D (natural images, or a single slice)."""
    raw = json.loads((dataset / "dataset.json").read_text())
    ending = raw.get("file_ending", ".nii.gz").lower()
    if ending in (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"):
        return True
    import SimpleITK as sitk

    first = next(p for p in sorted((dataset / "imagesTr").iterdir()) if p.name.endswith(ending))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    reader.ReadImageInformation()
    return reader.GetDimension() == 2 or 1 in reader.GetSize()


def write_small_split(ws: _nnunet.Workspace, dataset: Path) -> None:
    """nnU-Net's seeded k-fold split with k = the number of cases, when there are fewer than 5."""
    raw = json.loads((dataset / "dataset.json").read_text())
    ending = raw.get("file_ending", ".nii.gz")
    cases = sorted(p.name[:-len(ending)] for p in (dataset / "labelsTr").iterdir() if p.name.endswith(ending))
    if len(cases) >= 5:
        return
    import numpy as np
    from sklearn.model_selection import KFold

    splits = []
    for train, val in KFold(n_splits=len(cases), shuffle=True, random_state=12345).split(cases):
        splits.append({"train": list(np.array(cases)[train]), "val": list(np.array(cases)[val])})
    (folder,) = ws.preprocessed.glob(f"Dataset{DATASET_ID:03d}_*")
    (folder / "splits_final.json").write_text(json.dumps(splits, indent=1))


def run(args: argparse.Namespace) -> int:
    ws = _nnunet.Workspace(args.work.resolve())
    for folder in (ws.raw, ws.preprocessed, ws.results):
        folder.mkdir(parents=True, exist_ok=True)
    ws.add_dataset(args.dataset, DATASET_ID, "Bench")
    config = args.configuration if args.configuration != "auto" else ("2d" if is_2d(args.dataset) else "3d_fullres")
    install_trainer()
    env = ws.env(NNUNET_BUDGET_S=str(args.budget_s), NNUNET_SKIP_VALIDATION="1" if args.skip_validation else "0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n, did = str(args.jobs), str(DATASET_ID)
    args.output.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}

    def stage(name: str, cmd: list[str]) -> None:
        print(f"$ {' '.join(cmd)}", flush=True)
        log = args.work / f"{name}.log"
        m = measure(cmd, env=env, log=log, interval=POLL_S)
        stages[name] = {"wall_s": round(m.wall_s, 1), "cpu_s": round(m.cpu_s, 1), "peak_pss_mb": round(m.peak_pss_mb),
                        "returncode": m.returncode}
        if args.timings:
            args.timings.write_text(json.dumps({"configuration": config, "trainer": TRAINER, "stages": stages}, indent=1))
        print(f"{name}: {m.wall_s:.0f}s, peak {m.peak_pss_mb:.0f} MB, exit code {m.returncode}", flush=True)
        if m.returncode:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"nnU-Net {name} failed (exit code {m.returncode}); log {log}")

    stage("plan", ws.command("nnUNetv2_plan_and_preprocess", "-d", did, "-c", config, "-np", n, "-npfp", n,
                             "--no_pbar"))
    write_small_split(ws, args.dataset)
    stage("train", ws.command("nnUNetv2_train", did, config, "0", "-tr", TRAINER, "-device", args.device))
    stage("predict", ws.command("nnUNetv2_predict", "-i", str(args.dataset / "imagesTs"), "-o", str(args.output),
                                "-d", did, "-c", config, "-f", "0", "-tr", TRAINER, "-chk", "checkpoint_final.pth",
                                "-device", args.device, "-npp", n, "-nps", n, "--disable_progress_bar"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="dataset folder with imagesTs (nnU-Net v2 layout)")
    p.add_argument("--output", type=Path, required=True, help="folder for the test-case predictions")
    p.add_argument("--budget-s", type=float, required=True, help="training wall clock in seconds")
    p.add_argument("--work", type=Path, required=True, help="nnU-Net's raw/preprocessed/results folders go here")
    p.add_argument("--timings", type=Path, default=None, help="JSON file for the time and memory of each stage")
    p.add_argument("--jobs", type=int, default=2, help="processes for preprocessing and export")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-validation", action="store_true",
                   help="skip nnU-Net's final full-image validation of the fold (the suite scores test cases)")
    p.add_argument("--configuration", default="auto", help="nnU-Net configuration (default: 3d_fullres, 2d for 2D)")
    args = p.parse_args(argv)
    args.dataset = args.dataset.resolve()
    args.output = args.output.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (_nnunet.venv_bin() / "nnUNetv2_train").exists():
        raise SystemExit(f"nnU-Net is not installed in {_nnunet.VENV} (benchmarks/_nnunet.ensure_venv() makes it)")
    # nnU-Net's pools default to 8 processes (export, validation) and up to 12 augmentation workers: on a small
    # machine, spawning them costs more than the work; use the suite's number of jobs like autoseg does
    os.environ.setdefault("nnUNet_n_proc_DA", str(args.jobs))
    os.environ.setdefault("nnUNet_def_n_proc", str(args.jobs))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
