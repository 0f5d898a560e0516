"""The training loop: one (configuration, fold) run, configured by plans.json alone.

- the schedule is in steps (poly learning rate), derived from the run's seconds and the measured step
  time; a fresh run re-derives it once from its own first steps, so it spends the budget it was given;
- batches are a pure function of (seed, step), and checkpoints are written atomically every few minutes
  and at the end, so a killed run resumes where its last checkpoint left it, bit for bit;
- ``extend_s`` continues a finished run with more budget (a warm restart of the poly schedule), its steps
  re-fitted to its own pace like a fresh run's (the last pace may have been measured on a busier machine);
- the periodic checkpoint's interval is the plan's (a share of the run's budget: ``autoseg.plan.budget``), never
  so short that writing checkpoints takes more than 1 % of the run (the write is timed), unless given explicitly;
- a run guarded by a :class:`~autoseg.claims.Claim` (several workers on one workdir) stops without writing
  once another worker has taken it over;
- AMP on CUDA, bf16 autocast on CPU when planned, channels-last when measured faster;
- under ``torchrun`` it runs as DDP: the batch is split across ranks and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.checkpoint import load_checkpoint, save_checkpoint, unwrap
from autoseg.claims import Claim
from autoseg.crossval import load_splits
from autoseg.device import AUTOCAST
from autoseg.distributed import DistContext
from autoseg.errors import UserError
from autoseg.losses import InteriorLoss, build_loss
from autoseg.nets import build_network, training_outputs
from autoseg.regions import region_masks
from autoseg.schema.plans import Augmentation, Configuration, Optimizer, Plans
from autoseg.trainlog import TrainLog
from autoseg.workdir import RunDir, Workdir

logger = logging.getLogger(__name__)
VALIDATION_BATCHES = 4
ADAPT_AFTER_STEPS = 30
CHECKPOINT_COST_SHARE = 0.01  # the planned interval stretches so that writing checkpoints stays under this


@dataclass
class RunResult:
    folder: Path
    steps: int
    finished: bool
    seconds: float
    val_dice: dict[str, float] = field(default_factory=dict)  # last patch validation, per class name


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files an atomic write leaves behind when the process is killed mid-write
    (``.<name>.*.tmp``, ``.tmp-<name>``): a resumed run starts from a clean folder."""
    stale = [p for pattern in (".*.tmp", ".tmp-*") for p in folder.rglob(pattern) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def make_optimizer(cfg: Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"plans.json: unknown optimizer '{cfg.name}' (sgd, adamw)")


def poly_lr(base: float, step: int, total: int, exponent: float, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (1 - min(step, total - 1) / max(total, 1)) ** exponent


def no_augmentation(cfg: Configuration) -> Configuration:
    """The same configuration with every augmentation off: for validation patches."""
    off = Augmentation(rotation_deg=0.0, scale=[1.0, 1.0], elastic=False, noise=0.0, blur=0.0, brightness=0.0,
                       contrast=0.0, gamma=0.0, low_resolution=0.0, mirror_axes=[], dummy_2d=False)
    return replace(cfg, augmentation=off)


class RankBatches:
    """Each DDP rank draws its own batches: rank r of w takes batch ``step * w + r`` of the sequence."""

    def __init__(self, maker, rank: int, world: int):
        self.maker, self.rank, self.world = maker, rank, world

    def make(self, step: int) -> dict:
        return self.maker.make(step * self.world + self.rank)


class PatchDice:
    """Global Dice per class over validation patches, from accumulated TP/FP/FN (nnU-Net's pseudo Dice).
    With ``regions`` the classes are the regions: sigmoid above 0.5 against the region masks."""

    def __init__(self, num_classes: int, regions: list[tuple[int, ...]] | None = None):
        n = len(regions) if regions else num_classes - 1
        self.regions = regions
        self.tp, self.fp, self.fn = np.zeros(n), np.zeros(n), np.zeros(n)

    def update(self, logits: torch.Tensor, target: torch.Tensor, ignore: int | None) -> None:
        valid = (target != ignore) if ignore is not None else torch.ones_like(target, dtype=torch.bool)
        if self.regions:  # sigmoid above 0.5 against each region's mask
            preds, truths = (logits > 0).unbind(1), region_masks(target, self.regions).unbind(1)
        else:
            pred, classes = logits.argmax(1), range(1, len(self.tp) + 1)
            preds, truths = [pred == c for c in classes], [target == c for c in classes]
        for k, (p, t) in enumerate(zip(preds, truths)):
            p, t = p & valid, t & valid
            self.tp[k] += (p & t).sum().item()
            self.fp[k] += (p & ~t).sum().item()
            self.fn[k] += (~p & t).sum().item()

    def dice(self) -> np.ndarray:
        denom = 2 * self.tp + self.fp + self.fn
        return np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), np.nan)


def _with_losses(state: dict, losses: list[torch.Tensor], carried: tuple[float, int]) -> dict:
    """``state`` with the losses of the validation interval in progress (their sum and count, this process's),
    for a checkpoint: the run resumed from it logs the interval's mean over every step, not only its own."""
    total = (torch.stack(losses).float().sum().item() if losses else 0.0) + carried[0]
    return {**state, "loss_sum": total, "loss_steps": len(losses) + carried[1]}


def _forward_loss(model, loss_fn, data, target, dev, precision, interior=None, instances=None, weight=None):
    amp = AUTOCAST.get(precision)
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        # a network that computes its own losses (Mask R-CNN) takes the target (and the instance map, where the
        # dataset has one) and returns its loss terms
        out = (model(data, target, instances) if getattr(unwrap(model), "trains_on_targets", False)
               else model(data))
    return out, loss_fn(out, target) if interior is None else loss_fn(out, target, interior, weight)


class Trainer:
    """One run. Construct cheaply; ``fit()`` does the work."""

    def __init__(self, workdir: Path | str, configuration: str, fold: int, *, plans: Plans | None = None,
                 seconds: float | None = None, steps: int | None = None, extend_s: float | None = None,
                 device: str | None = None, seed: int = 0, workers: int | None = None, progress: bool = True,
                 checkpoint_every_s: float | None = None, splits_file: Path | str | None = None,
                 stop_after: int | None = None, folder: Path | str | None = None,
                 on_validation: Callable[[int, float], None] | None = None,
                 init_weights: Path | str | None = None, claim: Claim | None = None):
        self.work = Workdir.of(workdir)
        self.plans = plans or self.work.load_plans()
        if configuration not in self.plans.configurations:
            raise UserError(f"plans.json has no configuration '{configuration}' "
                            f"(it has {', '.join(self.plans.configurations)})")
        self.name, self.fold = configuration, fold
        self.cfg = self.plans.configurations[configuration]
        self.seconds, self.steps, self.extend_s = seconds, steps, extend_s
        self.device, self.seed, self.workers, self.progress = device, seed, workers, progress
        # seconds between periodic checkpoints: the argument (``autoseg train --checkpoint-every``), taken as given,
        # else the plan's, stretched at run time when writing a checkpoint costs more than CHECKPOINT_COST_SHARE
        self.checkpoint_every_s = self.cfg.schedule.checkpoint_every_s if checkpoint_every_s is None else checkpoint_every_s
        self.checkpoint_stretches = checkpoint_every_s is None
        self.claim = claim
        if not (self.checkpoint_every_s > 0 and math.isfinite(self.checkpoint_every_s)):
            raise UserError(f"checkpoint interval {self.checkpoint_every_s!r}: expected a positive number of seconds")
        self.splits_file, self.stop_after = splits_file, stop_after
        # another folder than runs/<config>/fold_<k> (search trials), and a hook called with (step, mean Dice)
        # after each validation on the main process; it may raise to end the run there (a pruned trial)
        self.run = RunDir(Path(folder)) if folder is not None else self.work.run(configuration, fold)
        self.folder = self.run.folder
        self.on_validation = on_validation
        # a checkpoint whose network weights a fresh run starts from (the search's trial of this configuration
        # and fold): ignored when the run resumes, since its own checkpoint already holds them
        self.init_weights = Path(init_weights) if init_weights is not None else None

    # --- setup --------------------------------------------------------------------------------------
    def _split(self) -> tuple[list[str], list[str]]:
        ids = self.work.cached_cases(self.name)
        splits = load_splits(self.work, ids, self.plans.folds, self.splits_file)
        if not 0 <= self.fold < len(splits):
            raise UserError(f"fold {self.fold} does not exist: the split has folds 0..{len(splits) - 1}")
        return splits[self.fold]["train"], splits[self.fold]["val"]

    def _total_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.seconds is not None:
            return max(1, int(self.seconds / max(self.cfg.measured.step_time_s, 1e-6)))
        return self.cfg.schedule.steps

    def fit(self) -> RunResult:
        from autoseg.loader import BatchMaker, PatchLoader, default_workers

        dist = DistContext.start(self.device)
        dev, cfg, plans = dist.device, self.cfg, self.plans
        train_ids, val_ids = self._split()
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest kernels once
            torch.cuda.reset_peak_memory_stats(dev)
        torch.manual_seed(self.seed + 1000 * self.fold)
        model = build_network(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim).to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last_3d if cfg.ndim == 3 else torch.channels_last)
        optimizer = make_optimizer(cfg.optimizer, model)
        scaler = torch.amp.GradScaler(dev.type) if cfg.precision == "fp16" and dev.type == "cuda" else None
        n_outputs = training_outputs(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim)
        loss_fn = build_loss(cfg.loss, plans.num_classes, plans.ignore_label, n_outputs, plans.regions)
        if cfg.network.instance_outputs:  # the touching-object formulation: the interior output trains too
            loss_fn = InteriorLoss(loss_fn, plans.num_classes, cfg.instances.interior_weight,
                                   cfg.instances.seed_dice, cfg.instances.threshold)

        state, start = self._resume(model, optimizer, scaler)
        if start == 0 and state.get("init_weights") and dist.is_main:
            logger.info(f"{self.name} fold {self.fold}: starting from the weights in {self.init_weights}")
        if state.get("finished") and not self.extend_s:
            if dist.is_main:
                logger.info(f"{self.folder}: already finished ({state['total_steps']} steps); --extend T to train more")
            dist.stop()
            return self._result(state)
        if self.extend_s and state.get("finished"):
            more = max(1, int(self.extend_s / max(state.get("seconds_per_step") or cfg.measured.step_time_s, 1e-6)))
            state.update(total_steps=state["total_steps"] + more, finished=False, adapt=False)
            if state.get("budget_s"):  # a timed run: the extension is timed too, re-fitted to its own pace
                # (after a warm-up of 5 steps: a first guess below that would end before its pace is known)
                state.update(adapt=True, budget_s=state["elapsed_s"] + self.extend_s,
                             total_steps=start + max(more, 7))
            state.setdefault("extensions", []).append({"at_step": start, "steps": more, "seconds": self.extend_s})
        model = dist.wrap(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        log = TrainLog(self.run, plans.scored_classes)
        per_rank = replace(cfg, batch_size=max(1, math.ceil(cfg.batch_size / dist.world)))
        if dist.is_main:
            remove_stale_temp_files(self.folder)
            log.truncate_after(start)
            self._say_layout(state, start, dist, per_rank.batch_size)
        state.update(world=dist.world, batch_per_rank=per_rank.batch_size)
        maker = BatchMaker(self.work.preprocessed(self.name), train_ids, per_rank,
                           seed=self.seed * 7919 + self.fold, ignore_label=plans.ignore_label)
        workers = default_workers() if self.workers is None else self.workers
        loader = PatchLoader(RankBatches(maker, dist.rank, dist.world), start_step=start, num_workers=workers,
                             pin_memory=dev.type == "cuda")
        val_maker = BatchMaker(self.work.preprocessed(self.name), val_ids, no_augmentation(cfg),
                               seed=12345, ignore_label=plans.ignore_label)
        try:
            result = self._loop(model, optimizer, scaler, loss_fn, loader, val_maker, log, state, start, dist)
        finally:
            loader.close()
        dist.stop()
        return result

    def _say_layout(self, state: dict, start: int, dist: DistContext, per_rank: int) -> None:
        """Under DDP, say how the batch is split; warn when a run resumes with another number of ranks
        (its batches from here on differ from an uninterrupted run's)."""
        if dist.world > 1:
            logger.info(f"{self.folder}: DDP over {dist.world} processes ({dist.backend}, {dist.device.type}): "
                     f"batch {self.cfg.batch_size} = {dist.world} x {per_rank} per rank")
        before = state.get("world")
        if start > 0 and before is not None and before != dist.world:
            logger.warning(f"{self.folder}: resumed at step {start} with {dist.world} process(es), started with "
                        f"{before}: the batches differ from here on")

    def _resume(self, model, optimizer, scaler) -> tuple[dict, int]:
        latest = self.run.latest
        if not latest.is_file():
            total = self._total_steps()
            state = {"total_steps": total, "elapsed_s": 0.0, "finished": False, "seed": self.seed,
                     "adapt": self.steps is None, "budget_s": self.seconds, "configuration": self.name,
                     "fold": self.fold}
            if self.init_weights is not None:
                self._start_from(model, self.init_weights)
                state["init_weights"] = str(self.init_weights)
            return state, 0
        ck = load_checkpoint(latest)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        state = dict(ck["state"])
        if state.get("seed") != self.seed:
            raise UserError(f"{latest}: this run was started with seed {state.get('seed')}, not {self.seed}; "
                            f"use that seed or delete {self.folder}")
        return state, int(ck["step"])

    def _start_from(self, model, path: Path) -> None:
        """Load another run's network weights; one that does not fit this network is a user error (the
        configuration was edited after the run that wrote them)."""
        try:
            model.load_state_dict(load_checkpoint(path)["model"])
        except (RuntimeError, KeyError) as e:
            raise UserError(f"{path}: its weights do not fit configuration '{self.name}' "
                            f"({str(e).splitlines()[0]}); delete it to train from scratch") from None

    # --- the loop ----------------------------------------------------------------------------------
    def _loop(self, model, optimizer, scaler, loss_fn, loader, val_maker, log, state, start, dist) -> RunResult:
        from tqdm import tqdm

        cfg, dev = self.cfg, dist.device
        total = state["total_steps"]
        bar = tqdm(total=total, initial=start, desc=f"train {self.name} fold {self.fold}", unit="step",
                   disable=not (self.progress and dist.is_main), dynamic_ncols=True)
        t_run, t_ckpt, elapsed0 = time.perf_counter(), time.perf_counter(), state["elapsed_s"]
        losses, step, it, last_row = [], start, iter(loader), None
        # the losses of this validation interval before a resume (sum, steps), so the row after it averages
        # the whole interval, as an uninterrupted run's does
        carried = (float(state.pop("loss_sum", 0.0)), int(state.pop("loss_steps", 0)))
        fmt = (torch.channels_last_3d if cfg.ndim == 3 else torch.channels_last) if cfg.channels_last else None
        adapting = bool(state.get("adapt") and state.get("budget_s"))
        # the first re-fit: after ADAPT_AFTER_STEPS, or halfway through a shorter run (an extension)
        first_fit = start + min(ADAPT_AFTER_STEPS, max(6, (state["total_steps"] - start) // 2))
        t_adapt, every = None, self.checkpoint_every_s
        try:
            while step < state["total_steps"]:
                if self.stop_after is not None and step >= self.stop_after:
                    break
                lr = poly_lr(cfg.optimizer.lr, step, state["total_steps"], cfg.schedule.poly_exponent,
                             cfg.schedule.warmup_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                batch = next(it)
                data = batch["data"].to(dev, non_blocking=True)
                target = batch["target"].to(dev, non_blocking=True).long()
                interior = batch["interior"].to(dev, non_blocking=True) if "interior" in batch else None
                weight = batch["interior_weight"].to(dev, non_blocking=True) if "interior_weight" in batch else None
                if fmt is not None:
                    data = data.contiguous(memory_format=fmt)
                instances = batch["instances"].to(dev, non_blocking=True) if "instances" in batch else None
                _, loss = _forward_loss(model, loss_fn, data, target, dev, cfg.precision, interior, instances, weight)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                losses.append(loss.detach())  # no .item(): a GPU sync per step
                step += 1
                if self.claim is not None:
                    self.claim.check()  # taken over by another worker: stop here, write nothing
                bar.update(1)
                if step == start + 5:
                    t_adapt = time.perf_counter()  # after warm-up: kernel selection, worker start
                warm = t_adapt is not None and step > start + 5  # a rate needs a step after the warm-up
                if adapting and warm and (step == first_fit or step % cfg.schedule.val_every == 0):
                    now = time.perf_counter()
                    rate = (now - t_adapt) / (step - start - 5)
                    spent = elapsed0 + now - t_run
                    state["total_steps"] = dist.broadcast_int(self._adapted_total(state, step, rate, spent))
                    bar.total = state["total_steps"]
                if step % cfg.schedule.val_every == 0 or step == state["total_steps"]:
                    dice = self._validate(model, val_maker, dist)
                    total_loss = (torch.stack(losses).float().sum().item() if losses else 0.0) + carried[0]
                    n_losses = len(losses) + carried[1]
                    mean_loss = dist.mean(total_loss / n_losses if n_losses else float("nan"))
                    carried = (0.0, 0)
                    row = {"step": step, "elapsed_s": elapsed0 + time.perf_counter() - t_run, "lr": lr,
                           "loss": mean_loss}
                    row.update(self._dice_row(dice))
                    losses, last_row = [], row
                    if dist.is_main:
                        log.append(row)
                        bar.set_postfix(loss=f"{row['loss']:.3f}", dice=f"{row['val_dice_mean']:.3f}")
                        if self.on_validation is not None:
                            self.on_validation(step, row["val_dice_mean"])
                if time.perf_counter() - t_ckpt > every and step < state["total_steps"]:
                    state["elapsed_s"] = elapsed0 + time.perf_counter() - t_run
                    t_write = time.perf_counter()
                    self._save(self.run.latest, model, optimizer, scaler, step, _with_losses(state, losses, carried),
                               dist)
                    t_ckpt = time.perf_counter()
                    if self.checkpoint_stretches:  # writing stays under CHECKPOINT_COST_SHARE of the time
                        every = max(self.checkpoint_every_s, (t_ckpt - t_write) / CHECKPOINT_COST_SHARE)
        except KeyboardInterrupt:
            state["elapsed_s"] = elapsed0 + time.perf_counter() - t_run
            self._save(self.run.latest, model, optimizer, scaler, step, _with_losses(state, losses, carried), dist)
            bar.close()
            raise
        bar.close()
        state["elapsed_s"] = elapsed0 + time.perf_counter() - t_run
        state = _with_losses(state, losses, carried)  # a run stopped between validations resumes its interval
        state["seconds_per_step"] = state["elapsed_s"] / max(step, 1)
        if dev.type == "cuda":
            state["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        finished = step >= state["total_steps"]
        state["finished"] = finished
        self._save(self.run.latest, model, optimizer, scaler, step, state, dist)
        if finished:
            self._save(self.run.final, model, optimizer, scaler, step, state, dist)
        if dist.is_main:
            log.plot()
        result = self._result(state, step)
        # the last row this process computed; rank 0's log.csv otherwise (other ranks never read a file
        # rank 0 may be appending to)
        rows = [last_row] if last_row is not None else (log.rows() if dist.is_main else [])
        if rows:
            result.val_dice = {k[len("val_dice_"):]: float(v) for k, v in rows[-1].items()
                               if k.startswith("val_dice_") and v not in ("", "nan", None)
                               and math.isfinite(float(v))}
        return result

    def _adapted_total(self, state: dict, step: int, seconds_per_step: float, spent_s: float) -> int:
        """Re-derive the total from this run's own speed (loader and validation included) so the run
        spends its budget: the plan measured the bare network, and a shared machine's speed drifts.
        Done after warm-up and again at every validation, so the poly schedule ends with the budget."""
        remaining = state["budget_s"] - spent_s  # less than a step left: stop here (not one more, every time)
        return step + max(0, int(remaining / max(seconds_per_step, 1e-6)))

    @torch.inference_mode()
    def _validate(self, model, val_maker, dist) -> np.ndarray:
        if not dist.is_main:
            return np.full(len(self.plans.scored_classes), np.nan)
        net = unwrap(model)
        net.eval()
        scores = PatchDice(self.plans.num_classes, self.plans.regions)
        for k in range(VALIDATION_BATCHES):
            b = val_maker.make(k)
            data = torch.as_tensor(b["data"]).to(dist.device)
            target = torch.as_tensor(b["target"]).to(dist.device).long()
            amp = AUTOCAST.get(self.cfg.precision)
            with torch.autocast(dist.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = net(data)
            out = out[0] if isinstance(out, (list, tuple)) else out
            scores.update(out[:, :self.plans.num_classes].float(), target, self.plans.ignore_label)
        net.train()
        return scores.dice()

    def _dice_row(self, dice: np.ndarray) -> dict:
        row = {"val_dice_mean": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")}
        for name, d in zip(self.plans.scored_classes.values(), dice):
            row[f"val_dice_{name}"] = float(d)
        return row

    def _save(self, path: Path, model, optimizer, scaler, step: int, state: dict, dist) -> None:
        if dist.is_main:
            if self.claim is not None:
                self.claim.verify()  # never write over the checkpoint of the worker that took the run over
            save_checkpoint(path, unwrap(model), optimizer, scaler, step, dict(state))

    def _result(self, state: dict, step: int | None = None) -> RunResult:
        return RunResult(self.folder, int(step if step is not None else state["total_steps"]),
                         bool(state.get("finished")), float(state.get("elapsed_s", 0.0)))
