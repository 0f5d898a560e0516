"""Training throughput, autoseg vs nnU-Net, and the loader against the step (issue 4, Performance).

    python benchmarks/train_throughput.py [--threads 1] [--patch 64x96x96] [--batch 2] [--repeats 3] [--quick]

**Throughput.** One training step of the same network on the same batch, in one run: nnU-Net's own
``nnUNetTrainer.train_step`` (in its venv, benchmarks/_nnunet.py) against autoseg's trainer step in fp32,
fp32 channels-last and bf16 autocast + channels-last. The network is what nnU-Net's planner makes for an
isotropic 64x96x96 patch: PlainConvUNet, 5 stages of 2 convs (3x3x3), features 32..320, strides 2 on
every axis, instance norm, LeakyReLU, deep supervision. nnU-Net's trainer is built from a plans dict and
its own methods make the network (``build_network_architecture``), the optimizer (SGD Nesterov 0.99) and
the loss (Dice + CE with deep supervision); the batch holds the deep-supervision targets its loader would
give. On CPU nnU-Net runs fp32 (it enables autocast only on CUDA). autoseg's step is the body of
``Trainer._loop``: channels-last copy of the batch, forward under autocast, Dice + CE with deep
supervision, backward, gradient clipping at 12, SGD Nesterov.

Each variant runs in its own worker process that keeps its network, optimizer and batch between steps;
the rounds alternate the variants (reversed every other round) so that the load of a shared machine hits
them alike: one untimed warm-up step each, then ``--repeats`` timed rounds. Reported: median and minimum
seconds per step, CPU seconds per step, samples per second, training FLOPs per step (counted exactly: from
each convolution's shapes for autoseg, FlopCounterMode on the meta device for nnU-Net) and the GFLOP/s reached.

**Loader.** :func:`autoseg.loader.measure_loader` (one process, one BLAS thread, as a worker) on a real
preprocessed cache: ``autoseg synth mri-nested --size small`` and ``autoseg plan --budget 15m -j 2``
(made once under benchmarks/work/, reused), for the planned ``3d_fullres`` configuration and for the
64x96x96 batch of 2 (planned augmentation, and every augmentation on). The loader keeps up when the
time per batch divided by the worker processes is below the step time measured in the same rounds.

Writes the "Throughput" section of benchmarks/results/train.md (with ``--threads N``: "Throughput, N torch
threads per process", every worker pinned to N threads; both tools default to one per core); other sections
of that file are kept. ``--quick`` (patch 32x48x48, 2 rounds) checks the whole thing in about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "train"
RESULTS = BENCH / "results" / "train.md"
TARGET_SPEEDUP = 4.0
MARK = "@@autoseg-bench "  # prefix of the workers' protocol lines: the tools print other things to stdout
SECTION = "Throughput"
CHOICE = "autoseg planner's choice"  # stands for the variant the planner's rule picks from the measurements
TASK, SIZE, SEED = "mri-nested", "small", 0

# nnU-Net's plan for an isotropic dataset with a 64x96x96 patch (features 32 doubling to a cap of 320;
# pooling every axis while it stays >= 4 voxels: 4 poolings, bottleneck 4x6x6)
REFERENCE_NETWORK = {"family": "unet", "features": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
                     "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "decoder_convs": 2, "norm": "instance",
                     "nonlin": "leaky_relu", "deep_supervision": True}
IN_CHANNELS, NUM_CLASSES = 1, 3  # mri-nested: one MRI channel; background, organ, lesion


# --- workers: one process per variant, one step per request ------------------------------------------


# where a step's time goes: torch op name -> category (self CPU time, from torch.profiler)
CATEGORIES = {
    "convolution forward": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution",
                            "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward", "aten::slow_conv_transpose3d"),
    "convolution backward": ("aten::convolution_backward", "aten::slow_conv3d_backward"),
    "instance norm (forward + backward)": ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                                           "aten::_batch_norm_impl_index", "aten::batch_norm", "aten::instance_norm",
                                           "aten::native_group_norm", "aten::native_group_norm_backward"),
    "copies, layout changes, concatenation": ("aten::copy_", "aten::cat", "aten::contiguous", "aten::clone",
                                              "aten::to", "aten::_to_copy"),
    "LeakyReLU (forward + backward)": ("aten::leaky_relu", "aten::leaky_relu_", "aten::leaky_relu_backward"),
}


def _profile(step: Callable[[], float]) -> dict[str, float]:
    """Self CPU seconds of one step by category (everything else: loss, optimizer, autograd, elementwise)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_op: dict[str, float] = {}
    for evt in prof.key_averages():
        by_op[evt.key] = by_op.get(evt.key, 0.0) + evt.self_cpu_time_total / 1e6
    out = {cat: sum(by_op.pop(op, 0.0) for op in ops) for cat, ops in CATEGORIES.items()}
    out["everything else (loss, optimizer, gradient clipping, autograd, elementwise)"] = sum(by_op.values())
    return out


def _serve(step: Callable[[], float], info: dict) -> None:
    """Answer each ``step`` line on stdin with one timed step (wall and CPU seconds, peak RSS so far), and a
    ``profile`` line with one profiled step's time by category."""
    import torch

    info = {**info, "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(MARK + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "profile":
            print(MARK + json.dumps(_profile(step)), flush=True)
            continue
        if line.strip() != "step":
            break
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(MARK + json.dumps({"wall_s": wall, "cpu_s": cpu, "loss": loss, "peak_rss_mb": peak}), flush=True)


def _random_batch(spec: dict):
    import torch

    g = torch.Generator().manual_seed(spec["seed"])
    data = torch.randn(spec["batch"], spec["in_channels"], *spec["patch"], generator=g)
    target = torch.randint(0, spec["num_classes"], (spec["batch"], *spec["patch"]), generator=g, dtype=torch.int16)
    return data, target


def _flops_meta(build: Callable, spec: dict) -> float:
    """Training FLOPs (forward with every head + backward) of the network ``build()`` makes, on meta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().train()
        x = torch.empty(spec["batch"], spec["in_channels"], *spec["patch"])
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            sum(o.sum() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    return float(counter.get_total_flops())


def _nnunet_plans(spec: dict) -> tuple[dict, dict]:
    """A plans dict and dataset.json as nnU-Net's planner and a raw dataset would give them."""
    net, ndim = spec["network"], len(spec["patch"])
    conv, norm = ("Conv3d", "InstanceNorm3d") if ndim == 3 else ("Conv2d", "InstanceNorm2d")
    n = len(net["features"])
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": net["features"],
                            "conv_op": f"torch.nn.modules.conv.{conv}", "kernel_sizes": net["kernel_sizes"],
                            "strides": net["strides"], "n_conv_per_stage": [2] * n,
                            "n_conv_per_stage_decoder": [net["decoder_convs"]] * (n - 1), "conv_bias": True,
                            "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": spec["batch"], "patch_size": spec["patch"], "median_image_size_in_voxels": spec["patch"],
              "spacing": [1.0] * ndim, "normalization_schemes": ["ZScoreNormalization"] * spec["in_channels"],
              "use_mask_for_norm": [False] * spec["in_channels"], "batch_dice": False, "architecture": arch}
    plans = {"dataset_name": "Dataset599_Throughput", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1.0] * ndim,
             "original_median_shape_after_transp": spec["patch"], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": list(range(ndim)), "transpose_backward": list(range(ndim)),
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {}, "configurations": {"3d_fullres": config},
             "continue_training": False}  # run_training adds this key before making the trainer
    labels = {"background": 0, **{f"class{i}": i for i in range(1, spec["num_classes"])}}
    dataset = {"labels": labels, "channel_names": {str(i): "MRI" for i in range(spec["in_channels"])},
               "numTraining": 1, "file_ending": ".nii.gz"}
    return plans, dataset


def _set_threads(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])


def nnunet_worker(spec: dict) -> None:
    """nnU-Net's trainer, initialised as ``nnUNetTrainer.initialize`` does (network, optimizer, loss; the
    dataset class is all it leaves out), stepping with its own ``train_step``. Runs in nnU-Net's venv."""
    import contextlib

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    _set_threads(spec)
    plans, dataset = _nnunet_plans(spec)
    with contextlib.redirect_stdout(sys.stderr):  # its banner and logs; stdout carries the protocol
        trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))
        trainer.num_input_channels = spec["in_channels"]
        trainer.network = trainer.build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(trainer.device)
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        trainer.loss = trainer._build_loss()
        trainer.was_initialized = True
        trainer.network.train()  # on_train_epoch_start
        trainer.lr_scheduler.step(0)
    data, target = _random_batch(spec)
    # what nnU-Net's loader hands over: int16 (B, 1, *patch) targets, one per deep-supervision scale
    target = target[:, None]
    targets = [target[(slice(None), slice(None), *(slice(None, None, round(1 / f)) for f in scale))]
               for scale in trainer._get_deep_supervision_scales()]
    batch = {"data": data, "target": [t.contiguous() for t in targets]}
    cm = trainer.configuration_manager
    flops = _flops_meta(lambda: get_network_from_plans(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        spec["in_channels"], spec["num_classes"], allow_init=False, deep_supervision=True), spec)
    params = sum(p.numel() for p in trainer.network.parameters())
    _serve(lambda: float(trainer.train_step(batch)["loss"]),
           {"parameters": params, "flops": flops, "autocast": trainer.device.type == "cuda"})


def autoseg_worker(spec: dict) -> None:
    """autoseg's trainer step (the body of ``Trainer._loop``) on the network a plan describes."""
    import torch
    from torch import nn

    from autoseg.losses import build_loss
    from autoseg.nets import build_network, count_parameters, training_outputs
    from autoseg.schema.plans import Loss, Network, Optimizer
    from autoseg.train import _forward_loss, make_optimizer

    _set_threads(spec)
    cfg, ndim = Network(**spec["network"]), len(spec["patch"])
    torch.manual_seed(spec["seed"])
    dev = torch.device("cpu")
    model = build_network(cfg, spec["in_channels"], spec["num_classes"], ndim).to(dev).train()
    fmt = (torch.channels_last_3d if ndim == 3 else torch.channels_last) if spec["channels_last"] else None
    if fmt is not None:
        model = model.to(memory_format=fmt)
    opt_cfg = Optimizer()
    optimizer = make_optimizer(opt_cfg, model)
    loss_fn = build_loss(Loss(), spec["num_classes"], None,
                         training_outputs(cfg, spec["in_channels"], spec["num_classes"], ndim))
    batch_data, batch_target = _random_batch(spec)

    def step() -> float:
        data, target = batch_data.to(dev), batch_target.to(dev).long()
        if fmt is not None:
            data = data.contiguous(memory_format=fmt)
        _, loss = _forward_loss(model, loss_fn, data, target, dev, spec["precision"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        return loss.item()

    flops = _flops_meta(lambda: build_network(cfg, spec["in_channels"], spec["num_classes"], ndim), spec)
    _serve(step, {"parameters": count_parameters(model), "flops": flops})


# --- the coordinator ---------------------------------------------------------------------------------


class Worker:
    """A worker process: ``step()`` runs one training step there and returns its timing."""

    def __init__(self, name: str, python: str, kind: str, spec: dict, log: Path, env: dict | None = None):
        self.name, self.log = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(log, "w")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", kind, "--spec",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env, cwd=REPO)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        sys.exit(f"{self.name}: worker ended (exit {self.proc.returncode}); see {self.log}:\n"
                 f"{self.log.read_text()[-3000:]}")

    def step(self, what: str = "step") -> dict:
        self.proc.stdin.write(what + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=60)
        self._err.close()


def autoseg_bin() -> str:
    here = Path(sys.executable).parent / "autoseg"
    return str(here) if here.exists() else "autoseg"


def planned_workdir() -> Path:
    """A real preprocessed cache and plan: ``autoseg synth`` + ``autoseg plan`` once, reused afterwards."""
    data, work = BENCH / "work" / "data" / f"{TASK}_{SIZE}_seed{SEED}", WORK / "autoseg"
    if not (data / "dataset.json").is_file():
        subprocess.run([autoseg_bin(), "-q", "synth", TASK, str(data), "--size", SIZE, "--seed", str(SEED)],
                       check=True)
    if not (work / "plans.json").is_file() or not any((work / "preprocessed" / "3d_fullres").glob("*.npy")):
        subprocess.run([autoseg_bin(), "-q", "plan", str(data), "-w", str(work), "--budget", "15m", "-j", "2"],
                       check=True)
    return work


def loader_cases(work: Path, patch: list[int], batch: int, quick: bool) -> list[tuple[str, object, str]]:
    """(label, BatchMaker, the step variant it is compared with) for each loader measurement."""
    from dataclasses import replace

    from autoseg.loader import BatchMaker
    from autoseg.schema.plans import Plans
    from autoseg.workdir import Workdir

    plans = Plans.load(work / "plans.json")
    cfg = plans.configurations["3d_fullres"]
    folder, ids = work / "preprocessed" / "3d_fullres", Workdir(work).cached_cases("3d_fullres")
    big = replace(cfg, patch_size=list(patch), batch_size=batch)
    every = replace(big, augmentation=replace(cfg.augmentation, elastic=True, mirror_axes=list(range(cfg.ndim))))
    cases = [(f"planned 3d_fullres: patch {fmt_patch(cfg.patch_size)}, batch {cfg.batch_size}, planned augmentation",
              BatchMaker(folder, ids, cfg, seed=0, ignore_label=plans.ignore_label), "autoseg planned"),
             (f"patch {fmt_patch(patch)}, batch {batch}, planned augmentation",
              BatchMaker(folder, ids, big, seed=0, ignore_label=plans.ignore_label), CHOICE)]
    if not quick:
        cases.append((f"patch {fmt_patch(patch)}, batch {batch}, every augmentation (elastic, mirroring all axes)",
                      BatchMaker(folder, ids, every, seed=0, ignore_label=plans.ignore_label),
                      CHOICE))
    return cases


def fmt_patch(patch: list[int]) -> str:
    return "x".join(map(str, patch))


def run(args: argparse.Namespace) -> dict:
    import _nnunet
    import torch

    from autoseg.device import detect_device
    from autoseg.loader import default_workers, measure_loader
    from autoseg.plan.compute import count_step_flops
    from autoseg.schema.plans import Network, Plans

    work = planned_workdir()
    plans = Plans.load(work / "plans.json")
    planned = plans.configurations["3d_fullres"]
    bf16 = detect_device("cpu").bf16
    base = {"network": REFERENCE_NETWORK, "in_channels": IN_CHANNELS, "num_classes": NUM_CLASSES,
            "patch": args.patch, "batch": args.batch, "seed": 0, "threads": args.threads}
    variants: dict[str, tuple[str, str, dict, dict | None]] = {}
    versions = {"autoseg venv": {"torch": torch.__version__}}
    if not args.no_nnunet:
        _nnunet.ensure_venv()
        versions["nnU-Net venv"] = _nnunet.versions(packages=("nnunetv2", "dynamic_network_architectures",
                                                                "torch", "numpy"))
        ws = _nnunet.Workspace.create("train_throughput")
        variants["nnU-Net"] = (str(_nnunet.venv_bin() / "python"), "nnunet", {**base, "precision": "fp32",
                                                                              "channels_last": False}, ws.env())
    setups = [("fp32", False), ("fp32", True)] + ([("bf16", True)] if bf16 else [])
    # as the `autoseg` command runs (autoseg/cli.py): idle OpenMP threads sleep unless the user says otherwise
    ours = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for precision, cl in setups:
        name = f"autoseg {precision}{' channels-last' if cl else ''}"
        variants[name] = (sys.executable, "autoseg", {**base, "precision": precision, "channels_last": cl}, ours)
    variants["autoseg planned"] = (sys.executable, "autoseg", {
        **base, "network": _asdict(planned.network), "patch": planned.patch_size, "batch": planned.batch_size,
        "in_channels": plans.in_channels, "num_classes": plans.num_classes, "precision": planned.precision,
        "channels_last": planned.channels_last}, ours)

    logs = WORK / "logs"
    workers = {name: Worker(name, py, kind, spec, logs / f"{name.replace(' ', '_')}.log", env)
               for name, (py, kind, spec, env) in variants.items()}
    makers = loader_cases(work, args.patch, args.batch, args.quick)
    steps: dict[str, list[dict]] = {name: [] for name in workers}
    loader: dict[str, list[float]] = {label: [] for label, _, _ in makers}
    loads: list[float] = []
    t_start = time.perf_counter()
    try:
        for round_ in range(args.repeats + 1):
            elapsed = time.perf_counter() - t_start
            if round_ >= 2 and elapsed / round_ * (round_ + 1) > 60 * args.max_minutes:
                print(f"stopping after {round_ - 1} timed rounds: another would pass --max-minutes "
                      f"{args.max_minutes:g}", file=sys.stderr)
                break
            order = list(workers) if round_ % 2 == 0 else list(reversed(workers))
            for name in order:
                load = os.getloadavg()[0]
                r = workers[name].step()
                tag = "warm-up" if round_ == 0 else f"round {round_}"
                print(f"{tag}: {name:28s} {r['wall_s']:7.2f} s  CPU {r['cpu_s']:7.2f} s  loss {r['loss']:.3f}  "
                      f"load {load:.1f}", file=sys.stderr, flush=True)
                if round_:
                    steps[name].append({**r, "load": load})
                    loads.append(load)
            for label, maker, _ in makers:
                t = measure_loader(maker, steps=args.loader_steps, start_step=1000 * round_)
                print(f"{'warm-up' if round_ == 0 else f'round {round_}'}: loader {t:6.2f} s/batch  {label}",
                      file=sys.stderr, flush=True)
                if round_:
                    loader[label].append(t)
        profiles = {}
        for name in ("nnU-Net", "autoseg fp32", "autoseg bf16 channels-last"):
            if name in workers and not args.no_profile:
                profiles[name] = workers[name].step("profile")
                print(f"profiled one step of {name}", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    ref_flops = count_step_flops(Network(**REFERENCE_NETWORK), IN_CHANNELS, NUM_CLASSES, len(args.patch),
                                 args.patch, args.batch)
    planned_flops = count_step_flops(planned.network, plans.in_channels, plans.num_classes, planned.ndim,
                                     planned.patch_size, planned.batch_size)
    return {"steps": steps, "profiles": profiles, "info": {n: w.info for n, w in workers.items()},
            "loader": loader, "loads": loads, "makers": [(label, compare) for label, _, compare in makers],
            "versions": versions, "commit": git_commit(),
            "flops": {n: (planned_flops if n == "autoseg planned" else ref_flops) for n in workers},
            "planned": {"patch": planned.patch_size, "batch": planned.batch_size, "precision": planned.precision,
                        "channels_last": planned.channels_last, "features": planned.network.features,
                        "plan_step_s": planned.measured.step_time_s, "median_shape": planned.median_shape},
            "workers": default_workers(), "bf16": bf16, "rounds": len(loads) // max(1, len(workers)),
            "seconds": time.perf_counter() - t_start}


def _asdict(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


# --- the report --------------------------------------------------------------------------------------


def git_commit() -> str:
    measured = ("autoseg/nets", "autoseg/losses.py", "autoseg/train.py", "autoseg/loader.py", "autoseg/augment.py",
                "autoseg/plan/compute.py")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *measured], cwd=REPO, capture_output=True,
                               text=True).stdout.split()[1::2]
    except OSError:
        return "unknown"
    return head + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def render(args: argparse.Namespace, res: dict) -> str:
    import autoseg
    from autoseg.benchmark.measure import machine

    steps, info = res["steps"], res["info"]
    med = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in steps.items()}
    # the planner's rule (autoseg.plan.fit.choose_precision): bf16 + channels-last when > 1.1x faster than fp32
    bf = "autoseg bf16 channels-last"
    res["choice"] = bf if bf in med and 1.1 * med[bf] < med["autoseg fp32"] else "autoseg fp32"
    best = {n: min(r["wall_s"] for r in rs) for n, rs in steps.items()}
    cpu = {n: statistics.median(r["cpu_s"] for r in rs) for n, rs in steps.items()}
    nn_name = "nnU-Net" if "nnU-Net" in steps else None
    lines = [f"## {section_title(args.threads)}", "",
             "Issue 4, Performance, *Throughput* and item 3 (*loader time per batch below the step time*). "
             "Generated by `benchmarks/train_throughput.py`: "
             f"{res['rounds']} timed rounds after one warm-up step of each variant; the variants alternate within "
             "each round (reversed every other round), each in its own process holding its network, optimizer "
             "and batch.", "", "### Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    flags = _cpu_flags()
    lines.append(f"- bf16 instructions: AVX-512 BF16 {'yes' if 'avx512_bf16' in flags else 'no'}, "
                 f"AMX {'yes' if 'amx_bf16' in flags else 'no'}")
    loads = res["loads"]
    lines.append(f"- load average (1 min) before each timed step: median {statistics.median(loads):.1f}, "
                 f"range {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    if statistics.median(loads) > (os.cpu_count() or 1):
        lines.append("- **the machine was shared and busy**: other work ran during every step, so wall times are "
                     "longer and noisier than on an idle machine and the GFLOP/s are far below what this CPU "
                     "does alone. All variants ran under the same load in alternating rounds: the *ratios* are "
                     "the meaningful numbers; minima are the closest to an idle machine.")
    threads = sorted({i["threads"] for i in info.values()})
    if args.threads:
        lines.append(f"- every worker ran {args.threads} torch thread{'s' if args.threads > 1 else ''} "
                     f"(`--threads {args.threads}`; torch's default here is {os.cpu_count()}): what each tool's "
                     "kernels do per core. On a machine shared with other work it is also the steadier "
                     "measurement: with one thread per core, a process waits at OpenMP barriers for threads the "
                     "kernel has descheduled (both tools ran 2-3x slower with two threads than with one in "
                     "`--quick` checks at a load average of 6-7).")
    else:
        lines.append(f"- torch threads per worker: {', '.join(map(str, threads))} (each tool's default)")
    ni = info.get(nn_name, {}) if nn_name else {}
    ai = info[res["choice"]]
    lines += ["", f"### Step time at nnU-Net's network, patch {fmt_patch(args.patch)}, batch {args.batch}", "",
              f"Network: PlainConvUNet as nnU-Net plans it for an isotropic {fmt_patch(args.patch)} patch "
              f"(5 stages x 2 convs 3x3x3, features 32-64-128-256-320, stride 2 on every axis, instance norm, "
              f"LeakyReLU, deep supervision), {IN_CHANNELS} input channel, {NUM_CLASSES} classes: "
              f"{ai['parameters'] / 1e6:.2f} M parameters in autoseg"
              + (f", {ni['parameters'] / 1e6:.2f} M in nnU-Net" if ni else "")
              + f"; {res['flops'][res['choice']] / 1e12:.3f} TFLOP per training step (forward + backward, "
              "counted from each convolution's shapes by `autoseg.plan.compute.count_step_flops`"
              + (f"; nnU-Net's network by torch's FlopCounterMode on the meta device: {ni['flops'] / 1e12:.3f}"
                 if ni else "") + ").", "",
              "| variant | precision | layout | s/step median | s/step min | CPU s/step | samples/s (median) "
              "| GFLOP/s median (best) | vs nnU-Net, median (best) | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ref = [n for n in steps if n != "autoseg planned"]
    for n in ref:
        spec_prec = "fp32" if n == nn_name or "fp32" in n else "bf16 autocast"
        layout = "channels-last" if "channels-last" in n else "NCDHW"
        gf = res["flops"][n] / 1e9
        vs = (f"{med[nn_name] / med[n]:.2f}x ({best[nn_name] / best[n]:.2f}x)" if nn_name else "-")
        name = f"**{n}** (the planner's choice)" if n == res["choice"] else n
        lines.append(f"| {name} | {spec_prec} | {layout} | {med[n]:.2f} | {best[n]:.2f} | {cpu[n]:.2f} "
                     f"| {args.batch / med[n]:.3f} | {gf / med[n]:.0f} ({gf / best[n]:.0f}) | {vs} "
                     f"| {max(r['peak_rss_mb'] for r in steps[n]):.0f} |")
    lines += ["", "The planner's choice is what `autoseg.plan.fit.choose_precision` would pick from these "
              "measurements: bf16 autocast + channels-last when it is more than 1.1x faster than fp32."]
    if nn_name:
        c = res["choice"]
        ratio, ratio_best = med[nn_name] / med[c], best[nn_name] / best[c]
        lines += ["", f"- **autoseg ({c.removeprefix('autoseg ')}) / nnU-Net: {ratio:.2f}x samples per second** "
                      f"(median; {ratio_best:.2f}x on the fastest steps; {cpu[nn_name] / cpu[c]:.2f}x in CPU time); "
                      f"target >= {TARGET_SPEEDUP:.0f}x: **{'met' if ratio >= TARGET_SPEEDUP else 'NOT met'}**",
                  f"- same precision and layout as nnU-Net (autoseg fp32): {med[nn_name] / med['autoseg fp32']:.2f}x"]
    lines += ["", "All rounds (wall s / CPU s, load average before the step):", ""]
    for n, rs in steps.items():
        lines.append(f"- {n}: " + ", ".join(f"{r['wall_s']:.2f} / {r['cpu_s']:.2f} ({r['load']:.1f})" for r in rs))
    lines.append("- loss of the last step (same batch every step, so it falls when the step trains; nnU-Net's is "
                 "CE - Dice, autoseg's CE + 1 - Dice): "
                 + ", ".join(f"{n} {rs[-1]['loss']:.3f}" for n, rs in steps.items()))

    lines += profile_lines(res)

    p, w = res["planned"], res["workers"]
    lines += ["", "### Loader time per batch against the step time", "",
              f"`autoseg.loader.measure_loader` (one process, one BLAS thread, as a background worker; mean of "
              f"{args.loader_steps} batches per round after one that opens the memory maps) on the cache of "
              f"`autoseg synth {TASK} --size {SIZE}` planned with `autoseg plan --budget 15m -j 2`: the planned "
              f"`3d_fullres` is patch {fmt_patch(p['patch'])}, batch {p['batch']}, features {p['features']}, "
              f"{p['precision']}{', channels-last' if p['channels_last'] else ''} (the plan measured "
              f"{p['plan_step_s']:.2f} s per step). The images are {fmt_patch(p.get('median_shape', []))} voxels (median), so "
              f"the "
              f"{fmt_patch(args.patch)} patch is partly padding; augmentation costs the same. "
              f"`autoseg train` starts {w} background worker{'s' if w != 1 else ''} here "
              f"(`default_workers()`: CPUs - 1).", "",
              "| batch | loader s/batch median (min) | step it feeds | step s median | "
              f"loader / {w} worker{'s' if w != 1 else ''} < step? |", "|---|---|---|---|---|"]
    for label, compare in res["makers"]:
        compare = res["choice"] if compare == CHOICE else compare
        ts = res["loader"][label]
        per = statistics.median(ts) / w
        ok = per < med[compare]
        lines.append(f"| {label} | {_sec(statistics.median(ts))} ({_sec(min(ts))}) | {compare} | {_sec(med[compare])} "
                     f"| {'yes' if ok else '**no**'} ({per / med[compare]:.2f} of the step) |")
    lines += ["", "Loader rounds (s/batch, in the order of the table): "
              + "; ".join(", ".join(_sec(t) for t in ts) for ts in res["loader"].values()),
              "", "On 2 cores the background worker and the training step share the CPU: the loader keeps the "
              "step fed when its time per batch is below the step time, but it still takes its share of the "
              "two cores."]
    lines += ["", "### What is measured", "",
              "- nnU-Net: `nnUNetTrainer.train_step` itself (zero_grad, forward, `DC_and_CE_loss` with "
              "`MemoryEfficientSoftDiceLoss` wrapped in `DeepSupervisionWrapper` (weights 1/2^i, lowest 0), "
              "backward, `clip_grad_norm_(12)`, SGD Nesterov momentum 0.99, weight decay 3e-5) on a trainer made "
              "from a plans dict the way `nnUNetTrainer.initialize` makes its network, optimizer and loss; fp32 "
              "because nnU-Net disables autocast on CPU; NCDHW. The batch holds what its loader gives: data "
              "float32, targets int16 at each deep-supervision scale.",
              "- autoseg: the trainer's step (`autoseg.train`: `_forward_loss` under autocast, `build_loss(dice_ce)` "
              "with deep supervision, backward, `clip_grad_norm_(12)`, `make_optimizer`: SGD Nesterov 0.99, "
              "weight decay 3e-5) on `autoseg.nets.build_network`; the batch is copied to channels-last inside "
              "the step when the layout is channels-last, and the int16 target is made int64 as in the trainer. "
              "Its workers run with `OMP_WAIT_POLICY=PASSIVE`, as the `autoseg` command sets it (idle OpenMP "
              "threads sleep); nnU-Net's with its own defaults.",
              "- Same random batch every step (data N(0,1), labels uniform over the classes); seconds of one step "
              "from before zero_grad to after the optimizer step, in the worker; CPU s is that process's CPU time.",
              "- GFLOP/s: training FLOPs per step / seconds per step; samples/s: batch / seconds per step.",
              "- Peak RSS: each worker's own peak (its network, optimizer state, batch and the step's activations)."]
    lines += ["", "### Versions", "",
              f"- autoseg {autoseg.__version__} (commit {res.get('commit') or git_commit()})"]
    lines += [f"- {venv}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for venv, vs in res["versions"].items()]
    lines.append("- torch threads per worker: " + ", ".join(f"{n} {i['threads']}" for n, i in info.items()))
    cmd = "python benchmarks/train_throughput.py" + (" --quick" if args.quick else "") + (
        "" if args.quick else f" --patch {fmt_patch(args.patch)} --batch {args.batch}") + f" --repeats {args.repeats}" + (
        f" --threads {args.threads}" if args.threads else "") + (
        " --no-nnunet" if args.no_nnunet else "")
    lines += ["", "### Reproduce", "", "```", ". .venv/bin/activate", cmd, "```", "",
              f"The whole run took {res['seconds'] / 60:.1f} minutes (after the one-time synth/plan under "
              "benchmarks/work/). Per-worker logs: benchmarks/work/train/logs/."]
    return "\n".join(lines) + "\n"


def _sec(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}"


def profile_lines(res: dict) -> list[str]:
    """The profiled step of each tool by category, and what the convolutions reached."""
    profiles = res.get("profiles") or {}
    if not profiles:
        return []
    names = list(profiles)
    lines = ["", "### Where the step time goes", "",
             "One more step of each, under `torch.profiler`: the self time of each torch op (seconds inside "
             "the op on the thread that runs the step, its helper threads included), summed by kind.", "",
             "| seconds (share) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    totals = {n: sum(profiles[n].values()) for n in names}
    for cat in profiles[names[0]]:
        lines.append(f"| {cat} | " + " | ".join(f"{profiles[n][cat]:.2f} ({profiles[n][cat] / totals[n]:.0%})"
                                                 for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{totals[n]:.2f}**" for n in names) + " |")
    conv = {n: profiles[n]["convolution forward"] + profiles[n]["convolution backward"] for n in names}
    lines += ["", "- the convolutions (nearly all of the counted FLOPs) ran at "
              + ", ".join(f"{res['flops'][n] / conv[n] / 1e9:.0f} GFLOP/s in {n}" for n in names)
              + "; the whole profiled step at " + ", ".join(f"{res['flops'][n] / totals[n] / 1e9:.0f}" for n in names)
              + "."]
    ours = next((n for n in names if "bf16" in n), None)
    if "nnU-Net" in names and ours:
        need = TARGET_SPEEDUP * res["flops"]["nnU-Net"] / totals["nnU-Net"] / 1e9
        have = res["flops"][ours] / conv[ours] / 1e9
        lines.append(f"- {TARGET_SPEEDUP:.0f}x at the same FLOPs needs autoseg's whole step at {TARGET_SPEEDUP:.0f} x "
                     f"nnU-Net's rate = {need:.0f} GFLOP/s: {need / have:.2f}x what its bf16 convolutions *alone* "
                     f"reached here ({have:.0f} GFLOP/s), i.e. faster convolution kernels, not less overhead.")
    flags = _cpu_flags()
    if "avx512_bf16" in flags and "amx_bf16" not in flags:
        conv_ratio = (f" and were {conv['nnU-Net'] / conv[ours]:.1f}x nnU-Net's fp32 ones here"
                      if "nnU-Net" in names and ours else "")
        lines.append("- This CPU has AVX-512 BF16 but no AMX: a bf16 dot-product instruction does twice the "
                     "multiply-adds of an fp32 FMA, so bf16 convolutions can be about 2x faster than fp32 ones"
                     f"{conv_ratio}. AMX tiles (Intel Sapphire Rapids and later) would give far more.")
    return lines


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def section_title(threads: int) -> str:
    """One section per thread setting: the tools' defaults, and e.g. one thread per process."""
    if not threads:
        return SECTION
    return f"{SECTION}, {'one' if threads == 1 else threads} torch thread{'s' if threads > 1 else ''} per process"


def write_section(path: Path, section: str, text: str) -> None:
    """Replace ``## <section>`` (up to the next ``## ``) in the results file, or append it; the file's other
    sections (written by other benchmarks) stay as they are."""
    title = ["# Training: autoseg vs nnU-Net", "",
             "Issue 4, Performance. Each section is written by one benchmark in benchmarks/ and rewritten only "
             "by it: *Throughput* (each tool's default torch threads) and *Throughput, one torch thread per "
             "process* (`--threads 1`) by `train_throughput.py`; *Accuracy for the time spent* (equal budget, "
             "time-to-Dice) by the accuracy benchmark.", ""]
    old = path.read_text().splitlines() if path.is_file() else title
    head = f"## {section}"
    if head in old:
        start = old.index(head)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    else:
        old = old + [""] if old and old[-1].strip() else old
        start = end = len(old)
    new = old[:start] + text.rstrip("\n").splitlines() + ([""] if end < len(old) else []) + old[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(new).rstrip("\n") + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", default="64x96x96", help="patch (Z x Y x X) of the throughput comparison")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--loader-steps", type=int, default=3, help="batches per loader measurement")
    p.add_argument("--quick", action="store_true", help="a fast check: patch 32x48x48, 2 rounds, fewer batches")
    p.add_argument("--no-nnunet", action="store_true", help="autoseg only")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step of each tool")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every worker (default: torch's)")
    p.add_argument("--max-minutes", type=float, default=15.0,
                   help="no further round when it would end past this (at least one timed round)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("nnunet", "autoseg"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (nnunet_worker if args.worker == "nnunet" else autoseg_worker)(json.loads(args.spec))
        return 0
    if args.quick:
        args.patch, args.repeats, args.loader_steps = "32x48x48", min(args.repeats, 2), 2
    args.patch = [int(s) for s in args.patch.lower().split("x")]
    sys.path.insert(0, str(BENCH))
    if args.from_json:  # render again from a finished run's numbers
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args)
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "throughput.json").write_text(json.dumps(res, indent=1))
    report = render(args, res)
    write_section(args.out, section_title(args.threads), report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
