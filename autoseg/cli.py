"""The ``autoseg`` command line: argument parsing only; each command calls one public function.

Bad input ends with one line on stderr naming the file and the problem, and exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from autoseg.errors import DatasetError, UserError
from autoseg.version import __version__

EXIT_BAD_INPUT = 2
CACHE_ENV = "AUTOSEG_CACHE_DIR"


def cache_dir() -> Path | None:
    """autoseg's one cache folder on this machine (step measurements, benchmark downloads): ``$AUTOSEG_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/autoseg`` or ``~/.cache/autoseg``; ``AUTOSEG_CACHE_DIR=off`` keeps none. The command
    line reads it here and passes it on; the library takes it as an argument."""
    where = os.environ.get(CACHE_ENV)
    if where is not None:
        return None if where.strip().lower() in ("", "off", "none", "0") else Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autoseg"


def _jobs(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def _dice(value: str) -> float:
    d = float(value)
    if not 0 < d < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return d


def _add_min_dice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-dice", type=_dice, default=None, metavar="D",
                   help="the Dice below which `autoseg predict` should flag a case (quality.json): the quality "
                        "score's threshold is calibrated on the out-of-fold cases for it (default: their median "
                        "Dice minus 0.05)")


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--jobs", type=_jobs, default=None,
                   help="worker processes (default: the number of CPUs, %(default)s means that)")


def _add_workdir(p: argparse.ArgumentParser) -> None:
    p.add_argument("-w", "--workdir", type=Path, default=None,
                   help="where artifacts go (default: ./autoseg_work/<dataset folder name>)")


def _add_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", type=Path, default=None, metavar="MODEL.autoseg",
                   help="fine-tune this bundle's networks on the dataset (same channels and classes): its plans' "
                        "spacing, normalization, network and patch, a tenth of its learning rate, fewer steps, the "
                        "dataset's own cross-validation; the new bundle records where it came from")


def cmd_validate(a: argparse.Namespace) -> int:
    from autoseg.validate import validate_dataset

    problems = validate_dataset(a.dataset, jobs=a.jobs, progress=not a.quiet)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"autoseg validate: {len(problems)} problem(s) found in {a.dataset}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{a.dataset}: OK")
    return 0


def cmd_fingerprint(a: argparse.Namespace) -> int:
    from autoseg.fingerprint import extract_fingerprint
    from autoseg.workdir import Workdir

    fp = extract_fingerprint(a.dataset, jobs=a.jobs, progress=not a.quiet)
    print(f"wrote {Workdir.for_dataset(a.dataset, a.workdir).save_fingerprint(fp)}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from autoseg.synth import generate
    from autoseg.synth.scanner import parse_scanner

    out = generate(a.task, a.out_dir, cases=a.cases, size=a.size, seed=a.seed, scanner=parse_scanner(a.scanner))
    print(f"wrote {out}")
    return 0


def cmd_convert_msd(a: argparse.Namespace) -> int:
    from autoseg.msd import convert_msd

    out = convert_msd(a.src, a.dst, jobs=a.jobs)
    print(f"wrote {out}")
    return 0


def cmd_convert_dicom(a: argparse.Namespace) -> int:
    from autoseg.dicom.convert import convert_dicom

    print(convert_dicom(a.src, a.dst, jobs=a.jobs).summary())
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from autoseg.workflow import plan_dataset, summary

    if a.search:
        from autoseg.search import plan_with_search, search_summary

        if a.init is not None:
            raise UserError("--init fine-tunes a bundle's networks as they are: it does not go with --search")
        found = plan_with_search(a.dataset, a.workdir, budget=a.budget, trials=a.trials, storage=a.storage,
                                 planner=a.planner, device=a.device, jobs=a.jobs, replan=a.replan,
                                 progress=not a.quiet, folds=a.folds, remeasure=a.remeasure,
                                 measurements_dir=cache_dir())
        print(summary(found.plan))
        print(search_summary(found))
        return 0
    if a.trials is not None or a.storage is not None:
        raise UserError("--trials and --storage need --search")
    result = plan_dataset(a.dataset, a.workdir, planner=a.planner, budget=a.budget, device=a.device,
                          jobs=a.jobs, replan=a.replan, progress=not a.quiet, folds=a.folds,
                          preprocess_also=a.preprocess, remeasure=a.remeasure, measurements_dir=cache_dir(),
                          init=a.init)
    print(summary(result))
    return 0


def cmd_search_worker(a: argparse.Namespace) -> int:
    from autoseg.search import search_summary, search_worker

    print(search_summary(search_worker(a.workdir, storage=a.storage, trials=a.trials, device=a.device,
                                       workers=a.workers, progress=not a.quiet, dataset=a.dataset)))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from autoseg.distributed import is_main_process
    from autoseg.plan.budget import parse_duration
    from autoseg.workflow import plan_dataset, summary, train_dataset, train_summary

    every = None if a.checkpoint_every is None else parse_duration(a.checkpoint_every, "--checkpoint-every")
    budget = a.budget
    if a.init is not None:  # plan the fine-tuning (kept as it is when already planned: a resumed run)
        planned = plan_dataset(a.dataset, a.workdir, budget=a.budget, device=a.device, progress=not a.quiet,
                               measurements_dir=cache_dir(), init=a.init)
        if is_main_process():
            print(summary(planned))
        budget = None  # the plan took it
    result = train_dataset(a.dataset, a.workdir, configuration=a.config, fold=a.fold, budget=budget,
                           device=a.device, extend=a.extend, seed=a.seed, workers=a.workers,
                           progress=not a.quiet, splits_file=a.splits, steps=a.steps, checkpoint_every_s=every,
                           min_dice=a.min_dice)
    if is_main_process():  # under torchrun, one report (rank 0's)
        print(train_summary(result))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from autoseg.status import status_text, workdir_status

    print(status_text(workdir_status(a.workdir, storage=a.storage)))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from autoseg.predict import predict
    from autoseg.predict_inputs import parse_folds

    def report(line: str) -> None:
        tqdm.write(f"autoseg: error: {line}", file=sys.stderr)

    s = predict(a.model, a.input, a.output, configuration=a.config, folds=parse_folds(a.folds), device=a.device,
                mirror=a.mirror, overlap=a.overlap, tile_batch=a.tile_batch,
                save_probabilities=a.save_probabilities, jobs=a.jobs, progress=not a.quiet, report=report,
                allow_large=a.allow_large, instances=True if a.instances else None, series=a.series,
                output_format=a.output_format, segment_codes=a.segment_codes,
                report_model=lambda line: print(f"autoseg predict: {line}", file=sys.stderr))
    if s.mirror:
        print(f"autoseg predict: {s.mirror}", file=sys.stderr)
    instances = f", {s.instances} instance(s) in {a.output / 'instances.csv'}" if s.instances or a.instances else ""
    print(f"wrote {s.cases} prediction(s) to {a.output} in {s.seconds:.1f}s{instances}")
    if s.quality:
        from autoseg.quality import quality_lines

        flagged = sum(q.flagged for q in s.quality.values())
        print("\n".join(quality_lines(s.quality)))
        print(f"quality: {flagged} of {len(s.quality)} case(s) flagged; wrote {s.quality_file}")
    if s.failed:
        print(f"autoseg predict: {len(s.failed)} case(s) not predicted (see the errors above)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from autoseg.evaluate import METRICS_FILE, evaluate_folder, parse_tolerance, summary_lines
    from autoseg.report import REPORT_FILE, write_report

    out = a.output or a.pred_dir / METRICS_FILE
    html = out.parent / REPORT_FILE
    lesion_classes = [n.strip() for n in (a.lesion_classes or "").split(",") if n.strip()]
    result = evaluate_folder(a.pred_dir, a.ref_dir, a.dataset_json, parse_tolerance(a.nsd_tolerance),
                             jobs=a.jobs, progress=not a.quiet, output=out, also_writing=[html] if a.report else [],
                             lesion_classes=lesion_classes, ref_instances=a.ref_instances,
                             brats_dilation=a.brats_dilation)
    for w in result["warnings"]:
        print(f"autoseg evaluate: warning: {w}", file=sys.stderr)
    print("\n".join(summary_lines(result)))
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    if a.report:
        print(f"wrote {write_report(result, a.pred_dir, a.ref_dir, html, a.images, a.workdir)}")
    return 0


def cmd_select(a: argparse.Namespace) -> int:
    from autoseg.select import select_model, selection_table
    from autoseg.workdir import Workdir

    work = Workdir.for_dataset(a.dataset, a.workdir)
    print(selection_table(select_model(work, a.dataset, postprocessing=not a.no_postprocessing,
                                       min_dice=a.min_dice)))
    print(f"wrote {work.selection_file}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from autoseg.demo import run_demo

    run_demo(a.workdir or Path("autoseg_demo"), task=a.task, budget=a.budget, device=a.device,
             progress=not a.quiet, jobs=a.jobs, measurements_dir=cache_dir())
    return 0


def cmd_benchmark(a: argparse.Namespace) -> int:
    from autoseg.benchmark import run_benchmark

    downloads = cache_dir() or a.output / "downloads"  # real data is fetched once, into the cache
    run_benchmark(a.suite, a.output, budget=a.budget, datasets=a.datasets, methods=a.methods, cache=downloads,
                  progress=not a.quiet)
    return 0


def cmd_bundle(a: argparse.Namespace) -> int:
    from autoseg.bundle import pack_bundle

    print(f"wrote {pack_bundle(a.workdir, a.output, configuration=a.config, segment_codes=a.segment_codes)}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from autoseg.bundle import load_bundle

    b = load_bundle(a.bundle)
    print(json.dumps(b.manifest, indent=2) if a.json else b.card, end="\n" if a.json else "")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from autoseg.bundle import verify_bundle

    print(verify_bundle(a.bundle))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from autoseg.export import export_bundle

    if a.onnx is None and a.torchscript is None:
        raise UserError("autoseg export: give --onnx DIR and/or --torchscript DIR")
    for line in export_bundle(a.bundle, onnx_dir=a.onnx, torchscript_dir=a.torchscript, check=not a.no_check):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from autoseg import workdir as wd
    from autoseg.synth import SIZES, TASKS

    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring segmentation for medical images. Typical use: "
                    "`autoseg plan DATASET` then `autoseg train DATASET`.")
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on a generated dataset (about 5 minutes on a CPU)",
                       parents=[common],
                       description="Generate a synthetic dataset, then plan, train, select, predict the held-out "
                                   "test cases, evaluate and write a report; prints Dice per class and where "
                                   "everything is. Re-running resumes.")
    p.add_argument("-w", "--workdir", type=Path, default=None, help="where everything goes (default: ./autoseg_demo)")
    p.add_argument("--task", default="mri-nested", help="synthetic task (see `autoseg synth --help`)")
    p.add_argument("--budget", default="3m", help="training budget (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    _add_jobs(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("validate", parents=[common], help="check a dataset and list every problem found",
                       description="Check a dataset in the nnU-Net v2 raw layout and report every problem, "
                                   "one line each, naming the file. Exit code 2 when any is found.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    _add_jobs(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("fingerprint", parents=[common], help="extract dataset statistics to WORKDIR/fingerprint.json",
                       description="Extract spacing, shape, intensity and label statistics of every training "
                                   "case. Deterministic: the same dataset gives the same file for any -j.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    _add_workdir(p)
    _add_jobs(p)
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("plan", help="validate, fingerprint, plan and preprocess a dataset", parents=[common],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run validate -> fingerprint -> plan -> preprocess on a dataset.\n\n"
                                   "The planner measures real training steps of candidate networks on the device\n"
                                   "and fits patch, batch, width and the number of steps to the wall-clock budget.\n"
                                   f"Writes WORKDIR/{wd.FINGERPRINT_FILE}, WORKDIR/{wd.PLANS_FILE} (human-editable: edit it\n"
                                   f"and re-run `autoseg plan` or `autoseg train`) and WORKDIR/{wd.PREPROCESSED_DIR}/.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    _add_workdir(p)
    p.add_argument("--planner", default="default",
                   help="planner name (default, resenc) or path to your own planner .py file")
    p.add_argument("--budget", default=None,
                   help="wall-clock budget for training, e.g. 20m, 8h (default: 1h on CPU, 8h on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--folds", type=_jobs, default=None,
                   help="cross-validation folds (default: the existing plan's, else 5); a new number re-plans")
    p.add_argument("--replan", action="store_true", help="make a new plans.json even if one is up to date")
    p.add_argument("--remeasure", action="store_true",
                   help="time the candidate networks again (and re-plan) instead of reusing this machine's earlier "
                        "step measurements of the same setups (kept in ~/.cache/autoseg, or $AUTOSEG_CACHE_DIR; "
                        "'off' keeps none)")
    p.add_argument("--search", action="store_true",
                   help="search around the rules' configuration with Optuna (architecture, depth, width, patch, "
                        "loss, lr, augmentation, batch) inside the same budget; `autoseg train` then starts fold 0 from the "
                        "best trial's weights; the same command resumes it")
    p.add_argument("--trials", type=int, default=None,
                   help="search trials in all (default 12): the rules' point first, then single changes to it "
                        "(half or twice the width, lighter augmentation, ...; no mirroring first when a class lies on "
                        "one side of the images, as left/right labels do) for half of the others, then TPE")
    p.add_argument("--storage", default=None, metavar="URL|FILE.journal",
                   help="study storage shared by `autoseg search-worker`s (default: sqlite in WORKDIR)")
    p.add_argument("--preprocess", nargs="+", metavar="CONFIG", default=None,
                   help="also preprocess these configurations now (or 'all'); by default only the ones the budget "
                        "trains are, and `autoseg train --config NAME` preprocesses the others when asked")
    _add_init(p)
    _add_jobs(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("search-worker", parents=[common], help="join the search `autoseg plan --search` started",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run trials of the study `autoseg plan DATASET --search` started for WORKDIR, until\n"
                                   "the study has its trials or its search budget is spent, then write the best\n"
                                   "configuration to WORKDIR/plans.json. Start several, on this machine or on others\n"
                                   "that see WORKDIR (a shared disk), with a --storage they all reach: a database URL\n"
                                   "or a journal file on the shared disk.")
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--storage", default=None, metavar="URL|FILE.journal",
                   help="the study storage (default: the one plans.json names, else sqlite in WORKDIR)")
    p.add_argument("--trials", type=int, default=None, help="trials the study should have in all (default: its own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: from the CPU count)")
    p.add_argument("--dataset", type=Path, default=None, metavar="DIR",
                   help="the dataset, whose labels score the trials (default: the folder the study was started on)")
    p.set_defaults(func=cmd_search_worker)

    p = sub.add_parser("train", help="train the planned configurations and folds", parents=[common],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train the runs `autoseg plan` planned (or those asked for) inside the budget.\n"
                                   "A killed run resumes from its last checkpoint when the same command is run again;\n"
                                   "--extend continues finished runs with more budget. After each fold, its held-out\n"
                                   "cases are predicted on full images and scored\n"
                                   f"({wd.RUNS_DIR}/<config>/fold_<k>/{wd.VALIDATION_DIR}).\n"
                                   "Checkpoints every 5 % of a run (between 5 s and 5 minutes; plans.json:\n"
                                   "schedule.checkpoint_every_s), or as --checkpoint-every says.\n\n"
                                   "Start it several times on one workdir (one machine, or several sharing the disk)\n"
                                   "and the processes divide the runs: each run is claimed before it trains\n"
                                   f"(WORKDIR/{wd.CLAIMS_DIR}), a dead worker's run is taken over (at once on the same\n"
                                   "machine, else after --claim-timeout without a heartbeat), and the last run to\n"
                                   "finish selects and bundles, once. `autoseg status WORKDIR` shows who does what.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    _add_workdir(p)
    p.add_argument("--config", default=None, help="configuration to train (default: those in the plan's runs)")
    p.add_argument("--fold", default=None, help="fold number or 'all' (default: the plan's runs)")
    p.add_argument("--budget", default=None, help="total wall-clock budget, split over the runs (e.g. 15m)")
    p.add_argument("--extend", default=None, metavar="T", help="continue finished runs for T more (e.g. 10m)")
    p.add_argument("--steps", type=_jobs, default=None,
                   help="train exactly this many steps per run (repeatable; default: from the budget)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: from the CPU count)")
    p.add_argument("--splits", type=Path, default=None, help="a splits file (nnU-Net splits_final.json format)")
    p.add_argument("--checkpoint-every", default=None, metavar="T",
                   help="time between checkpoints, e.g. 2m or 30s, taken as given (default: the plan's, 5 %% of "
                        "the run, stretched when writing one costs over 1 %% of it): a killed run resumes from the "
                        "last one")
    p.add_argument("--claim-timeout", default="5m", metavar="T",
                   help="a run claimed by this worker counts as abandoned after T without its heartbeat (a lost "
                        "node; a dead process on the same machine is seen at once); default %(default)s")
    _add_init(p)
    _add_min_dice(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("status", parents=[common], help="progress of a workdir: runs, workers, search, bundle",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Print each planned run of WORKDIR (and any other a worker trained or claimed):\n"
                                   "its state, the worker holding it (host, pid; live, stale past its timeout, or\n"
                                   "dead), steps done of planned and the last validation Dice; the search's trials\n"
                                   "(from its study, else the trial table); and whether the bundle is current.\n"
                                   "Read only: safe while workers run.")
    p.add_argument("workdir", type=Path, nargs="?", default=None, metavar="WORKDIR",
                   help="the work directory (default: this folder if it has plans.json, else the only one under "
                        "./autoseg_work)")
    p.add_argument("--storage", default=None, metavar="URL|FILE.journal",
                   help="the search's storage when plans.json cannot name it (a URL with a password)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("select", parents=[common], help="choose the model and post-processing from the CV outputs",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score every trained configuration's out-of-fold predictions against the labels,\n"
                                   "build ensembles by greedy forward selection and tune post-processing (a factor\n"
                                   "on an unsure class's probabilities before the argmax, largest component,\n"
                                   "small-component removal, hole filling), each kept only if the mean Dice rises\n"
                                   "and no class falls. Writes WORKDIR/selection.json, which `autoseg predict`\n"
                                   "follows. `autoseg train` runs this at its end.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR")
    _add_workdir(p)
    p.add_argument("--no-postprocessing", action="store_true", help="select the model only, no post-processing")
    _add_min_dice(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("predict", parents=[common], help="segment images with a trained model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Segment every case of INPUT (a folder of CASE_XXXX<ending> files, one per channel,\n"
                                   "or one file) with the selected model in MODEL (a workdir or a .autoseg bundle):\n"
                                   "the trained folds of its configuration(s), probabilities averaged. Each case is\n"
                                   "written as OUTPUT/CASE<ending> with the input's "
                                   "spacing, origin and direction. A case that does not fit the model gets one error\n"
                                   "line and the others are still predicted (exit code 2 at the end). A model whose\n"
                                   "dataset has instance classes (or --instances) also writes OUTPUT/instances/CASE<ending>\n"
                                   "(one id per object) and OUTPUT/instances.csv (one row per object).\n\n"
                                   "INPUT may be a folder of DICOM files (needs `pip install 'autoseg[dicom]'`): one\n"
                                   "case, the only image series in it or the one --series names (one per channel for\n"
                                   "a model of several); --output-format seg or rtstruct writes a DICOM object that\n"
                                   "references that series, OUTPUT/<folder name>.seg.dcm or .rtstruct.dcm.")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("input", type=Path, metavar="INPUT")
    p.add_argument("output", type=Path, metavar="OUTPUT")
    p.add_argument("--config", default=None,
                   help="one configuration alone (default: the model WORKDIR/selection.json chose, an ensemble "
                        "of configurations or one; else the first planned)")
    p.add_argument("--folds", default="all", help="folds to ensemble, e.g. 0,1 (default: all trained ones)")
    p.add_argument("--mirror", choices=("auto", "on", "off"), default="auto",
                   help="test-time mirroring; auto: on when the first case takes at most 20 s of network time "
                        "with it on this device (default %(default)s)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window tile overlap (default %(default)s)")
    p.add_argument("--tile-batch", type=_jobs, default=None,
                   help="tiles per network pass (default: the training batch, at least 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write OUTPUT/CASE.npz: per-class probabilities (float16) in the input's geometry")
    p.add_argument("-j", "--jobs", type=_jobs, default=1,
                   help="export threads: with N > 1, N - 1 cases are written while the next is predicted")
    p.add_argument("--allow-large", action="store_true",
                   help="predict a case even when its resampling to the model's spacing needs more memory than "
                        "this machine has available (refused by default, with the size it would need)")
    p.add_argument("--instances", action="store_true",
                   help="also write instance maps (OUTPUT/instances/) and OUTPUT/instances.csv for a model "
                        "without instance classes: the connected components of each class (on by default for "
                        "a model whose dataset has instance classes)")
    p.add_argument("--series", action="append", default=[], metavar="UID|DESCRIPTION|K=UID",
                   help="DICOM input: the series to segment, by SeriesInstanceUID or SeriesDescription (needed when "
                        "the folder holds several); a model of several channels takes one per channel: "
                        "--series 0=UID --series 1=UID")
    p.add_argument("--output-format", default=None,
                   choices=("nii.gz", "nii", "nrrd", "mha", "mhd", "png", "bmp", "tif", "tiff", "seg", "rtstruct"),
                   help="how predictions are written (default: the input's file format; for DICOM input the "
                        "model's, else nii.gz); seg: a DICOM Segmentation, rtstruct: an RT Structure Set, both "
                        "referencing the DICOM input series")
    p.add_argument("--segment-codes", type=Path, default=None, metavar="FILE.json",
                   help="coded category and type per class for DICOM output: {\"liver\": {\"category\": "
                        "\"SCT:91723000:Anatomical Structure\", \"type\": \"SCT:10200004:Liver\"}}, over the model's "
                        "own codes class by class (default: the model's, from its bundle or selection.json; else a "
                        "generic Tissue code, the class name as the segment label)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", parents=[common], help="score predictions against reference labels",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Score each reference case against the prediction of the same file name: per class\n"
                                   "Dice, IoU, sensitivity, specificity, precision, HD95 (mm), NSD and volumes.\n"
                                   "A class empty in both scores NaN (left out of means); HD95 is NaN when either is\n"
                                   "empty; such cases are counted per class. Writes metrics.json and metrics.csv.\n"
                                   "Lesion classes (dataset.json's instance_classes, --lesion-classes) also get\n"
                                   "lesion-wise metrics: detection precision/recall/F1, lesion-wise Dice and panoptic\n"
                                   "quality, matching by IoU > 0.5 and by BraTS 2023's dilated overlap. Instances\n"
                                   "come from PRED_DIR/instances/ and the reference's sibling instancesTr/ or\n"
                                   "instancesTs/ when present, else from connected components of each class.")
    p.add_argument("pred_dir", type=Path, metavar="PRED_DIR")
    p.add_argument("ref_dir", type=Path, metavar="REF_DIR")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="dataset.json giving class names, regions, the ignore label and the file ending")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="metrics JSON file; the CSV goes beside it (default: PRED_DIR/metrics.json)")
    p.add_argument("--nsd-tolerance", default=None, metavar="MM|NAME=MM,...",
                   help="NSD tolerance in mm, for all classes or per class (default: the largest voxel spacing)")
    p.add_argument("--report", action="store_true",
                   help="also write report.html beside the metrics: tables, overlays of the best, median and worst cases")
    p.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="the cases' images (CASE_0000<ending>) for the report's overlays (default: label maps only)")
    p.add_argument("--workdir", type=Path, default=None, metavar="W",
                   help="a workdir whose runs' training curves go into the report")
    p.add_argument("--lesion-classes", default=None, metavar="NAME,...",
                   help="classes to score lesion by lesion besides dataset.json's instance_classes (label values "
                        "without --dataset-json)")
    p.add_argument("--ref-instances", type=Path, default=None, metavar="DIR",
                   help="reference instance maps (default: REF_DIR's sibling instancesTr/ or instancesTs/ if present)")
    p.add_argument("--brats-dilation", type=int, default=1, metavar="N",
                   help="dilation steps of the BraTS-style matching (BraTS-MET 2023: 1, glioma: 3; default 1)")
    _add_jobs(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("benchmark", parents=[common], help="run a suite of datasets x methods; write a leaderboard",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run every (dataset, method) cell of SUITE_FILE (TOML; see benchmarks/suites/)\n"
                                   "end to end: plan, train fold 0 within the budget, predict the held-out cases,\n"
                                   "score them with `autoseg evaluate`; time and peak memory per stage. Writes\n"
                                   "DIR/leaderboard.md, .csv and .png. Re-running skips finished cells; a failing\n"
                                   "cell is recorded as failed and the others go on.")
    p.add_argument("suite", type=Path, metavar="SUITE_FILE")
    p.add_argument("-o", "--output", type=Path, default=Path("autoseg_benchmark"),
                   help="where cells, data and the leaderboard go (default: ./autoseg_benchmark)")
    p.add_argument("--budget", default=None, help="override the suite's budget for every run (e.g. 2m)")
    p.add_argument("--datasets", type=_names, default=None, metavar="A,B", help="only these datasets")
    p.add_argument("--methods", type=_names, default=None, metavar="A,B", help="only these methods")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("bundle", parents=[common], help="pack a trained workdir into one shareable file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write the selected model of WORKDIR (plans, post-processing, the weights of its\n"
                                   "trained folds as safetensors, CV metrics, a model card) into one zip with a\n"
                                   "checksummed manifest; nothing in it is pickled or runs on load. `autoseg train`\n"
                                   "writes WORKDIR/model.autoseg at its end; `autoseg predict FILE IN OUT` uses it.")
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("-o", "--output", type=Path, default=None, help="bundle file (default: WORKDIR/model.autoseg)")
    p.add_argument("--config", default=None, help="configuration (default: WORKDIR/selection.json's)")
    p.add_argument("--segment-codes", type=Path, default=None, metavar="FILE.json",
                   help="coded category and type per class that the bundle carries for DICOM SEG output, as predict's "
                        "--segment-codes takes them (over dataset.json's segment_codes, class by class); shown "
                        "in the model card")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("info", parents=[common], help="print a bundle's model card",
                       description="Verify a bundle and print its model card: what it segments, its input channels, "
                                   "labels and cross-validation Dice.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--json", action="store_true", help="print the manifest instead")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", parents=[common], help="check that predict can load and run a bundle",
                       description="Check every member of a bundle against its manifest (sha256), refuse pickles, "
                                   "escaping paths, unknown format versions and damaged files, and check what "
                                   "`autoseg predict` relies on: the plans validate with sane sizes (patch, batch, "
                                   "channels, classes) and every fold's weights have the tensor names, shapes and "
                                   "dtypes of the network the plans build. A bundle that verifies is a bundle "
                                   "`predict` can load and run. Exit code 0 when it is sound, 2 with the reason "
                                   "otherwise.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", parents=[common], help="export a bundle's networks to ONNX or TorchScript",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write each fold's network (input: preprocessed image batch (N, C, *spatial),\n"
                                   "spatial sizes dynamic; output: logits) with the plans and post-processing JSON\n"
                                   "needed around it, and check the result against PyTorch on random input\n"
                                   "(ONNX: with onnxruntime, `pip install autoseg[onnx]`).")
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.add_argument("--onnx", type=Path, default=None, metavar="DIR", help="write ONNX models to DIR")
    p.add_argument("--torchscript", type=Path, default=None, metavar="DIR", help="write TorchScript models to DIR")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.set_defaults(func=cmd_export)

    tasks = "\n".join(f"  {name:<12} {t.description}" for name, t in TASKS.items())
    p = sub.add_parser("synth", parents=[common], help="generate a synthetic dataset (nnU-Net v2 layout)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"Generate a synthetic labelled dataset.\n\ntasks:\n{tasks}")
    p.add_argument("task", choices=sorted(TASKS), metavar="TASK")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--cases", type=_jobs, default=None, help="number of training cases (default: per size)")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="tiny (tests, seconds), small (demo) or bench (benchmarks); default %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scanner", default=None, metavar="KEY=V,...",
                   help="image every case with another scanner setting: gamma (tissue contrast), scale, offset "
                        "(calibration), blur (voxels), noise (share of the intensity range), spacing (voxel size "
                        "factor); e.g. gamma=2.5,noise=0.05")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert-msd", parents=[common], help="import a Medical Segmentation Decathlon task",
                       description="Convert an MSD task folder (4D NIfTI, channels last) into the nnU-Net v2 layout.")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    _add_jobs(p)
    p.set_defaults(func=cmd_convert_msd)

    p = sub.add_parser("convert-dicom", parents=[common], help="import DICOM studies labelled by SEG or RTSTRUCT objects",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert the DICOM studies under SRC (any nesting, any file names) into a new\n"
                                   "nnU-Net v2 dataset DST: each SEG or RTSTRUCT object is a case, its referenced\n"
                                   "image series imagesTr/CASE_0000.nii.gz, its segments labelsTr/CASE.nii.gz on that\n"
                                   "series' grid; classes named after the segments. The result is validated before\n"
                                   "it is put in place. Needs `pip install 'autoseg[dicom]'`.")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    _add_jobs(p)
    p.set_defaults(func=cmd_convert_dicom)
    return parser


class _ProgressAwareHandler(logging.Handler):
    """The library's notices on stderr, one line each, written between progress bars rather than through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            line = self.format(record)
            tqdm.write(f"autoseg: warning: {line}" if record.levelno >= logging.WARNING else line, file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's contract: a handler never raises)
            self.handleError(record)


def _configure_logging() -> None:
    """autoseg's library modules report through ``logging`` (they never print); the command line shows those
    reports on stderr, warnings prefixed."""
    logger = logging.getLogger("autoseg")
    if not any(isinstance(h, _ProgressAwareHandler) for h in logger.handlers):
        handler = _ProgressAwareHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(argv: list[str] | None = None, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    parser = parser_factory()
    a = parser.parse_args(argv)
    _configure_logging()
    try:
        return a.func(a)
    except UserError as e:
        if a.debug:
            raise
        for line in str(e).splitlines() or ["unknown error"]:
            print(f"autoseg: error: {line}" if not isinstance(e, DatasetError) else line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autoseg: interrupted", file=sys.stderr)
        return 130


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    # Idle OpenMP threads sleep instead of spinning: on a small CPU, spinning torch threads starve the data
    # loader's workers and everything else (measured: `autoseg plan` 2-4x faster on a busy 2-core machine).
    # Set before torch is imported; a user's own OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    exit_now(run())


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown, which takes 0.5-0.6 s once torch is loaded (measured here),
    on every command: flush the standard streams, run the exit handlers (multiprocessing joins or stops its
    children there), then ``os._exit``. A non-daemon thread still running gets the ordinary exit, which waits
    for it. Everything autoseg writes is written and closed (atomically) before a command returns."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`autoseg ... | head`)
            pass
    atexit._run_exitfuncs()
    os._exit(code)
