"""``autoseg demo``: the whole pipeline on a generated dataset, on whatever machine this is.

synth -> plan -> train -> select -> predict the held-out test cases -> evaluate -> report, in about five
minutes on two CPU cores with the default budget. Re-running it reuses what is already there (the plan,
finished training), so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_DATASET = "Dataset001_Demo"


def run_demo(workdir: Path | str = "autoseg_demo", task: str = "mri-nested", budget: str = "3m",
             device: str | None = None, progress: bool = True, jobs: int | None = None,
             measurements_dir: Path | None = None) -> dict:
    """Run every stage on ``task`` (a synthetic-suite task) into ``workdir``; returns the test metrics.
    ``measurements_dir``: this machine's store of step measurements (see :func:`autoseg.plan.make.make_plans`)."""
    from autoseg.evaluate import evaluate_folder, summary_lines
    from autoseg.predict import predict
    from autoseg.report import write_report
    from autoseg.synth import generate
    from autoseg.workdir import Workdir
    from autoseg.workflow import plan_dataset, summary, train_dataset, train_summary

    root = Path(workdir)
    data, work, preds = root / "data" / DEMO_DATASET, root / "work", root / "predictions"
    t0 = time.perf_counter()

    def stage(text: str) -> None:
        print(f"\n== {text} [{time.perf_counter() - t0:.0f}s]", file=sys.stderr)

    stage(f"generating the synthetic '{task}' dataset")
    if not (data / "dataset.json").is_file():
        generate(task, data, size="small", seed=0)
    stage(f"planning for a {budget} budget (measuring candidate networks on this device)")
    print(summary(plan_dataset(data, work, budget=budget, device=device, jobs=jobs, progress=progress,
                               measurements_dir=measurements_dir)))
    stage("training (resumes if interrupted)")
    print(train_summary(train_dataset(data, work, device=device, progress=progress)))
    stage("predicting the test cases in their original geometry")
    predict(work, data / "imagesTs", preds, device=device, progress=progress)
    stage("evaluating against the reference labels")
    metrics = evaluate_folder(preds, data / "labelsTs", data / "dataset.json", progress=progress,
                              output=preds / "metrics.json")
    report = write_report(metrics, preds, data / "labelsTs", preds / "report.html",
                          images_dir=data / "imagesTs", workdir=work)
    print("\n".join(summary_lines(metrics)))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    print(f"  dataset      {data}")
    wd = Workdir(work)
    print(f"  plans        {wd.plans_file}")
    print(f"  training     {wd.runs_dir}  (a log and training curves per fold)")
    bundle = wd.bundle_file
    if bundle.is_file():
        print(f"  model        {bundle}  (autoseg predict {bundle} INPUT OUTPUT)")
    print(f"  predictions  {preds}")
    print(f"  metrics      {preds / 'metrics.json'}")
    print(f"  report       {report}")
    return metrics
