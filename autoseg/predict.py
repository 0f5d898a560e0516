"""Prediction: segment new images with the trained folds and write each one in its input's own geometry.

A case goes through the pipeline the out-of-fold validation uses (:mod:`autoseg.oof`), so the
cross-validation numbers describe these outputs::

    read channels -> preprocess_case -> per fold: sliding-window logits -> softmax -> mean over folds
    -> restore to the original array one class at a time (running argmax) -> post-processing rules
    (:mod:`autoseg.postprocess`, tuned on the out-of-fold labels) -> write with the input's geometry

>>> predictor = Predictor.from_workdir("autoseg_work/Dataset001_CT")            # doctest: +SKIP
>>> seg, probs = predictor.predict_case(images, geometry, probabilities=True)   # doctest: +SKIP
>>> predictor.predict_files("imagesTs", "predictions")                          # doctest: +SKIP

Test-time mirroring (``mirror="auto"``): averaging the ``2**m`` flips of each tile costs ``2**m`` network
passes, cheap on a GPU and a minute per case for a CT on a laptop CPU. The first case decides, on the device
at hand: one batch of tiles is timed, and mirroring is on when the first case predicted with it is estimated
to take at most :data:`MIRROR_AUTO_MAX_S` seconds of network time (tiles x folds x flips). The decision then
holds for every case, so a folder is predicted one way.

Memory: the network output for a case is held once per class in the preprocessed space (plus one running
sum with several folds); at the original size only a running maximum, the label map and the class being
restored are held, whatever the number of classes. ``probabilities=True`` adds the float16 maps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.checkpoint import FINAL, load_checkpoint
from autoseg.errors import UserError
from autoseg.io import Geometry, read_images, write_label
from autoseg.nets import build_network
from autoseg.plan.model import PLANS_FILE, Plans
from autoseg.postprocess import apply_postprocessing, parse_rules
from autoseg.predict_inputs import (
    InputCase,
    check_images,
    choose_configuration,
    find_cases,
    trained_folds,
    with_resolved_normalization,
)
from autoseg.preprocess import preprocess_case, restore_to_original
from autoseg.sliding_window import AUTOCAST, count_tiles, sliding_window

MIRROR_AUTO_MAX_S = 20.0  # network seconds per case, with mirroring, below which ``auto`` turns it on
TILE_BAR_MIN = 64  # network passes in a case from which a progress bar over its tiles is shown
SOFTMAX_BLOCK = 1 << 18  # voxels per in-place softmax step


@dataclass
class PredictionSummary:
    """What :meth:`Predictor.predict_files` did: files written, cases refused (case -> reason), mirroring."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    mirror: str = ""
    seconds: float = 0.0


@dataclass
class _Prepared:
    """A case between the network and the export (which may run in a background thread)."""

    probabilities: torch.Tensor  # (K, Z, Y, X) in preprocessed space, mean over folds
    properties: dict[str, Any]
    geometry: Geometry


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` or the best available; a CUDA/MPS request on a machine without one is a user error."""
    from autoseg.plan.compute import best_device

    dev = torch.device(device or best_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine (use --device cpu)")
    return dev


def _precision_on(precision: str, dev: torch.device) -> str:
    """The planned precision where the device runs it: fp16 autocast on CUDA only, bf16 on CUDA and CPU."""
    if precision == "fp16" and dev.type != "cuda":
        return "fp32"
    if precision == "bf16" and dev.type == "mps":
        return "fp32"
    return precision


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, in place, a block of voxels at a time: no second (K, Z, Y, X) volume. Equal to
    ``torch.softmax(logits, 0)`` within a float32 rounding step (the vectorized kernel splits differently)."""
    logits = logits.contiguous()
    flat = logits.view(logits.shape[0], -1)
    for i in range(0, flat.shape[1], SOFTMAX_BLOCK):
        block = flat[:, i:i + SOFTMAX_BLOCK]
        block.copy_(torch.softmax(block, 0))
    return logits


class Predictor:
    """Trained folds of one configuration, ready to segment images held in memory or files on disk.

    Construct from plain data (plans, one state_dict per fold), so a workdir (:meth:`from_workdir`) and a
    bundle build it the same way; networks are built on first use. ``mirror`` is ``"auto"``, ``"on"`` or
    ``"off"`` (see the module docstring); ``tile_batch`` tiles go through the network at once (default: the
    training batch, at least 4).
    """

    def __init__(self, plans: Plans, configuration: str, weights: Sequence[Mapping[str, torch.Tensor]],
                 device: str | torch.device | None = None, *, folds: Sequence[int] | None = None,
                 mirror: str = "auto", overlap: float = 0.5, tile_batch: int | None = None,
                 progress: bool = False, postprocessing: Sequence[Mapping[str, Any]] = ()):
        if configuration not in plans.configurations:
            raise UserError(f"plans.json has no configuration '{configuration}' "
                            f"(it has {', '.join(plans.configurations)})")
        if any(isinstance(v, list) for v in plans.labels.values()):
            raise UserError("plans.json: region-based labels (sigmoid outputs) are not supported by predict yet")
        if not weights:
            raise UserError(f"no trained fold of configuration '{configuration}' to predict with")
        if mirror not in ("auto", "on", "off"):
            raise ValueError(f"mirror must be auto, on or off, not {mirror!r}")
        if not 0 <= overlap < 1:
            raise UserError(f"--overlap {overlap}: must be in [0, 1)")
        self.plans, self.name = plans, configuration
        self.cfg = plans.configurations[configuration]
        self.weights = list(weights)
        self.folds = list(folds) if folds is not None else list(range(len(self.weights)))
        self.device = resolve_device(device)
        self.precision = _precision_on(self.cfg.precision, self.device)
        self.mirror, self.overlap, self.progress = mirror, overlap, progress
        self.tile_batch = tile_batch or max(4, self.cfg.batch_size)
        self.mirror_axes: tuple[int, ...] = tuple(self.cfg.augmentation.mirror_axes)
        self._mirror_on: bool | None = {"on": True, "off": False}.get(mirror)
        self.mirror_note = "" if mirror == "auto" else f"mirroring {mirror} (--mirror {mirror})"
        self._models: list[torch.nn.Module] | None = None
        self.postprocessing = parse_rules([dict(r) for r in postprocessing])  # applied to every label map

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: Path | str, configuration: str | None = None, folds: Sequence[int] | None = None,
                     device: str | torch.device | None = None, **options: Any) -> Predictor:
        """Load ``WORKDIR/plans.json`` and the ``checkpoint_final.pt`` of each trained fold.

        The configuration: ``configuration``, else the one ``WORKDIR/selection.json`` names, else the first
        of the plan's training runs. ``folds`` None means every fold trained so far (one is enough).
        The post-processing rules ``selection.json`` tuned for that configuration are applied to its labels.
        """
        from autoseg.select import load_postprocessing
        from autoseg.train import run_folder

        workdir = Path(workdir)
        plans = Plans.load(workdir / PLANS_FILE)
        plans = with_resolved_normalization(plans, workdir)
        name = choose_configuration(workdir, plans, configuration)
        folds = trained_folds(workdir, name, folds)
        options.setdefault("postprocessing", load_postprocessing(workdir, name))
        weights = [load_checkpoint(run_folder(workdir, name, k) / FINAL)["model"] for k in folds]
        return cls(plans, name, weights, device, folds=folds, **options)

    @property
    def models(self) -> list[torch.nn.Module]:
        if self._models is None:
            self._models = []
            for state in self.weights:
                net = build_network(self.cfg.network, self.plans.in_channels, self.plans.num_classes, self.cfg.ndim)
                net.load_state_dict(state)
                self._models.append(net.to(self.device).eval())
        return self._models

    # --- one case in memory ------------------------------------------------------------------------
    def predict_case(self, images: np.ndarray, geometry: Geometry, probabilities: bool = False,
                     where: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
        """Segment one case ``(C, *spatial)``: the label map ``(*spatial)`` in the input's array, and with
        ``probabilities`` the per-class maps ``(K, *spatial)`` (float16) there too."""
        return self._export(self._prepare(images, geometry, where), probabilities)

    @torch.inference_mode()
    def preprocessed_probabilities(self, data: np.ndarray) -> torch.Tensor:
        """Softmax ``(K, Z, Y, X)`` of a preprocessed case ``(C, Z, Y, X)``, averaged over the folds."""
        mirror = self._decide_mirror(data.shape[1:])
        axes = self.mirror_axes if mirror else ()
        passes = count_tiles(data.shape[1:], self.cfg.patch_size, self.cfg.ndim, self.overlap) * len(self.models)
        bar = self._tile_bar(passes, 2 ** len(axes))
        total = None
        for model in self.models:
            logits = sliding_window(model, data, self.cfg.patch_size, self.plans.num_classes, self.cfg.ndim,
                                    self.device, overlap=self.overlap, mirror_axes=axes,
                                    tile_batch=self.tile_batch, precision=self.precision,
                                    channels_last=self.cfg.channels_last,
                                    progress=bar.update if bar is not None else None)
            probs = _softmax_(logits)
            total = probs if total is None else total.add_(probs)
            del logits, probs
        if bar is not None:
            bar.close()
        return total.div_(len(self.models)) if len(self.models) > 1 else total

    def _prepare(self, images: np.ndarray, geometry: Geometry, where: str) -> _Prepared:
        check_images(images, self.plans, where)
        data, _, props = preprocess_case(images, geometry, self.cfg, self.plans)
        return _Prepared(self.preprocessed_probabilities(data), props, geometry)

    def _export(self, prep: _Prepared, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Restore one class at a time with a running argmax: the same labels as restoring all maps and
        taking the argmax (ties to the lower class), holding one class at the original size, not K."""
        probs = prep.probabilities.numpy()
        shape = prep.properties["shape_original"]
        seg = np.zeros(shape, np.uint8 if probs.shape[0] <= 256 else np.uint16)
        maps = np.empty((probs.shape[0], *shape), np.float16) if probabilities else None
        best = None
        for c in range(probs.shape[0]):
            p = restore_to_original(probs[c:c + 1], prep.properties, self.cfg, is_label=False,
                                    fill=1.0 if c == 0 else 0.0)[0]
            if maps is not None:
                maps[c] = p
            if best is None:
                best = p
                continue
            better = p > best
            seg[better] = c
            np.maximum(best, p, out=best)
        if self.postprocessing:
            seg = apply_postprocessing(seg, self.postprocessing, prep.geometry.spacing)
        return seg, maps

    # --- mirroring decision --------------------------------------------------------------------------
    def _decide_mirror(self, shape: Sequence[int]) -> bool:
        if not self.mirror_axes:
            if self._mirror_on is None or self._mirror_on:
                self.mirror_note = "mirroring off (the plan trains without mirror augmentation)"
            self._mirror_on = False
        if self._mirror_on is None:
            flips = 2 ** len(self.mirror_axes)
            per_batch = self._time_tile_batch()
            batches = math.ceil(count_tiles(shape, self.cfg.patch_size, self.cfg.ndim, self.overlap) / self.tile_batch)
            estimate = per_batch * batches * len(self.models) * flips
            self._mirror_on = mirror_rule(estimate)
            self.mirror_note = (f"mirroring {'on' if self._mirror_on else 'off'} (--mirror auto: {flips} flips, "
                                f"~{estimate:.1f} s of network time per case with them on {self.device.type}, "
                                f"limit {MIRROR_AUTO_MAX_S:.0f} s)")
        return self._mirror_on

    @torch.inference_mode()
    def _time_tile_batch(self) -> float:
        """Seconds for one batch of tiles through one fold's network on this device: the fastest of three
        passes after a warm-up one (the least disturbed by other work on the machine)."""
        from autoseg.plan.compute import _sync

        model = self.models[0]
        x = torch.randn(self.tile_batch, self.plans.in_channels, *self.cfg.patch_size, device=self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if self.cfg.ndim == 3 else torch.channels_last)
        amp = AUTOCAST.get(self.precision)
        times = []
        for _ in range(4):
            _sync(self.device)
            t = time.perf_counter()
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(x)
            _sync(self.device)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    def _tile_bar(self, passes: int, flips: int):
        if not self.progress or passes * flips < TILE_BAR_MIN:
            return None
        from tqdm import tqdm

        return tqdm(total=passes, desc="tiles", unit="tile", leave=False, dynamic_ncols=True)

    # --- files ---------------------------------------------------------------------------------------
    def predict_files(self, input: Path | str, output: Path | str, save_probabilities: bool = False,
                      jobs: int = 1, report: Callable[[str], None] | None = None) -> PredictionSummary:
        """Predict every case of ``input`` (a folder in the ``CASE_XXXX<ending>`` naming, or one file) into
        ``output/CASE<ending>`` with the input's spacing, origin and direction; with ``save_probabilities``
        also ``output/CASE.npz`` (``probabilities``: float16, ``(K, *spatial)``).

        A case that breaks the input contract (channels, dimensionality, unreadable file) is skipped with
        one line passed to ``report`` and recorded in the summary; the other cases are still predicted.
        ``jobs`` > 1 exports (restore + write) in ``jobs - 1`` threads while the network runs the next case.
        """
        from tqdm import tqdm

        t0 = time.perf_counter()
        out = Path(output)
        cases = find_cases(Path(input), self.plans)
        if not cases:
            raise UserError(f"{input}: no images to predict (expected CASE_XXXX{self.plans.file_ending} files)")
        out.mkdir(parents=True, exist_ok=True)
        summary = PredictionSummary()
        pool = ThreadPoolExecutor(jobs - 1) if jobs > 1 else None
        pending: deque[tuple[InputCase, Future]] = deque()

        def fail(case: InputCase, message: str) -> None:
            summary.failed[case.id] = message
            if report is not None:
                report(message)

        def finish(case: InputCase, job: Callable[[], list[Path]]) -> None:
            try:
                summary.written += job()
            except UserError as e:
                fail(case, str(e))

        bar = tqdm(cases, desc="predict", unit="case", disable=not self.progress, dynamic_ncols=True)
        try:
            for case in bar:
                if case.problem:
                    fail(case, case.problem)
                    continue
                try:
                    images, geometry = read_images(case.images)
                    prep = self._prepare(images, geometry, case.where)
                except UserError as e:
                    fail(case, str(e))
                    continue
                del images

                def job(prep: _Prepared = prep, case: InputCase = case) -> list[Path]:
                    return self._write(prep, case, out, save_probabilities)

                if pool is None:
                    finish(case, job)
                else:
                    pending.append((case, pool.submit(job)))
                    while len(pending) > jobs - 1:
                        c, f = pending.popleft()
                        finish(c, f.result)
            while pending:
                c, f = pending.popleft()
                finish(c, f.result)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        summary.mirror = self.mirror_note
        summary.seconds = time.perf_counter() - t0
        return summary

    def _write(self, prep: _Prepared, case: InputCase, out: Path, save_probabilities: bool) -> list[Path]:
        seg, maps = self._export(prep, save_probabilities)
        path = out / f"{case.id}{case.ending}"
        write_label(seg, prep.geometry, path)
        written = [path]
        if maps is not None:
            write_probabilities(maps, out / f"{case.id}.npz")
            written.append(out / f"{case.id}.npz")
        return written


def mirror_rule(seconds_with_mirroring: float, limit: float = MIRROR_AUTO_MAX_S) -> bool:
    """``--mirror auto``: on when the network time of a case with every flip stays within ``limit``."""
    return seconds_with_mirroring <= limit


def write_probabilities(maps: np.ndarray, path: Path) -> None:
    """``probabilities`` (float16, compressed) in one ``.npz``, written atomically (as the OOF files are)."""
    import io

    from autoseg.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=maps.astype(np.float16, copy=False))
    atomic_write_bytes(buf.getvalue(), path)


def predict(model: Path | str, input: Path | str, output: Path | str, *, configuration: str | None = None,
            folds: Sequence[int] | None = None, device: str | None = None, mirror: str = "auto",
            overlap: float = 0.5, tile_batch: int | None = None, save_probabilities: bool = False,
            jobs: int = 1, progress: bool = True, report: Callable[[str], None] | None = None) -> PredictionSummary:
    """``autoseg predict MODEL INPUT OUTPUT``: MODEL is a workdir (plans.json + runs/) or a bundle file
    (``model.autoseg``, :mod:`autoseg.bundle`); see :meth:`Predictor.predict_files` for INPUT and OUTPUT."""
    model = Path(model)
    options = dict(mirror=mirror, overlap=overlap, tile_batch=tile_batch, progress=progress)
    if model.is_file():
        from autoseg.bundle import load_bundle

        predictor = load_bundle(model).predictor(configuration, folds, device, **options)
    elif not (model / PLANS_FILE).is_file():
        raise UserError(f"{model}: not a workdir (no {PLANS_FILE}) nor a bundle file; give the folder `autoseg "
                        "plan` and `autoseg train` wrote to, or its model.autoseg")
    else:
        predictor = Predictor.from_workdir(model, configuration, folds, device, **options)
    return predictor.predict_files(input, output, save_probabilities=save_probabilities, jobs=jobs, report=report)
