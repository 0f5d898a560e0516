"""Fit a configuration to the device: patch, width and batch under measured time and memory limits.

The order in which things are given up when the device cannot afford the ideal: first patch beyond
what holds the typical object, then width, then patch below the object size. Batch grows only when
memory and time are left over.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from autoseg.device import DeviceInfo
from autoseg.plan import compute, measurements
from autoseg.plan.compute import StepMeasurement
from autoseg.plan.rules import Topology, make_network, shrink_patch, topology
from autoseg.schema.plans import Measurement, Network

WIDTHS = (32, 16, 8)
MIN_BATCH = 2
PROXY_VOXELS = {3: 24 ** 3, 2: 96 ** 2}  # proxy patch for timing slow devices
MAX_PRECISION_NOISE = 0.5  # a precision's gradient error, as a share of the batch-to-batch gradient spread
PESSIMISM = 0.8  # a measured step below this share of the prediction re-runs the search for a bigger setup
MAX_REAL_MEASUREMENTS = 2  # of the chosen setup per configuration
HALF_BATCH_MIN = 2  # on a CPU the chosen setup is timed at half its batch when that is at least this
BF16_MIN_SPEEDUP = 1.1  # bf16 autocast is planned on a CPU when its proxy steps are this much faster
MIN_BOTTLENECK_VOXELS = 8  # the precision check's patch: instance norm over fewer values is ill-conditioned
JUDGE_DEPTH_MARGIN = 1.2  # ... else on a shallower network, its error scaled by the stage ratio and this margin
REAL_MEASURE_MAX_S = 3.0  # measure the final choice for real when a step is predicted below this
WARMUP_BOUND = 1.25  # on a CPU a warm-up step takes at most this times a timed one (measured 1.07-1.12x)


@dataclass
class FitRequest:
    family: str
    ndim: int
    spacing: list[float]
    median_shape: list[int]
    ideal_patch: list[int]
    object_patch: list[int]
    in_channels: int
    num_classes: int
    run_seconds: float
    min_steps: int
    feature_cap: int
    dataset_voxels: float = 1e9  # all training voxels at this spacing (2D: all slices): caps the batch
    blocks: list[int] | None = None  # per stage; None = the family's default rule
    decoder_convs: int = 2
    max_batch: int = 64
    precision: tuple[str, bool, float] | None = None  # (precision, channels_last, speedup) decided before


@dataclass
class FitResult:
    network: Network
    patch_size: list[int]
    batch_size: int
    precision: str
    channels_last: bool
    measured: Measurement
    steps: int
    log: list[str] = field(default_factory=list)
    precision_choice: tuple[str, bool, float] = ("fp32", False, 1.0)


class Throughput:
    """Measured FLOP/s per (width, precision), on a proxy patch, reused across candidates."""

    def __init__(self, device: DeviceInfo, req: FitRequest, store: measurements.Store | None = None):
        self.device, self.req, self.store = device, req, store
        self.cache: dict[tuple, tuple[float, float, StepMeasurement]] = {}
        self._params: dict[str, int] = {}

    def proxy(self, patch: list[int], divisor: list[int]) -> list[int]:
        """A patch of about ``PROXY_VOXELS`` shaped like ``patch``: each step shrinks the axis shrunk least so
        far, so an anisotropic 28x64x64 patch gets a 12x32x32 proxy rather than 28x16x16, whose tiny in-plane
        maps run at a fraction of the real patch's FLOP/s."""
        target = PROXY_VOXELS[self.req.ndim]
        p = list(patch)
        def bottleneck_after(axis: int) -> int:  # elements at the bottleneck after shrinking ``axis``
            return int(np.prod([(v - (divisor[a] if a == axis else 0)) // divisor[a] for a, v in enumerate(p)]))

        while np.prod(p) > target:  # instance norm needs more than one element at the bottleneck
            can = [a for a in range(len(p)) if p[a] - divisor[a] >= divisor[a] and bottleneck_after(a) >= 2]
            if not can:
                break
            axis = max(can, key=lambda a: (p[a] / patch[a], p[a]))
            p[axis] -= divisor[axis]
        return p

    def measure(self, net: Network, topo: Topology, precision: str,
                channels_last: bool) -> tuple[float, float, StepMeasurement]:
        """(FLOP/s, activation bytes per voxel-sample-channel, measurement) on the proxy for this width.
        Weights, gradients and momentum are a fixed cost, not a per-voxel one: they are taken out here and
        added back for the real network by ``_predict``."""
        key = (net.features[0], precision, channels_last)
        if key not in self.cache:
            r = self.req
            patch = self.proxy(topo.patch_size, topo.divisor)
            m = measurements.measure(self.store, net, r.in_channels, r.num_classes, r.ndim, patch, MIN_BATCH,
                                     self.device.type, precision, channels_last)
            self._keep(net, patch, key, m)
        return self.cache[key]

    def measure_precisions(self, net: Network, topo: Topology,
                           spread: bool = True) -> tuple[StepMeasurement, StepMeasurement]:
        """fp32 and bf16 + channels-last on the proxy for this width (bf16 with its gradient error; fp32 with
        its batch-to-batch spread unless ``spread`` is False)."""
        r = self.req
        patch = self.proxy(topo.patch_size, topo.divisor)
        m32, m16 = measurements.measure_precisions(self.store, net, r.in_channels, r.num_classes, r.ndim, patch,
                                                   MIN_BATCH, self.device.type, spread=spread,
                                                   decides_at=BF16_MIN_SPEEDUP)
        self._keep(net, patch, (net.features[0], "fp32", False), m32)
        self._keep(net, patch, (net.features[0], "bf16", True), m16)
        return m32, m16

    def _keep(self, net: Network, patch: list[int], key: tuple, m: StepMeasurement) -> None:
        r = self.req
        m.flops = compute.count_step_flops(net, r.in_channels, r.num_classes, r.ndim, patch, MIN_BATCH)
        activations = max(m.peak_memory_bytes - self.fixed_bytes(net), 0)
        per_unit = activations / (np.prod(patch) * MIN_BATCH * net.features[0])
        self.cache[key] = (m.flops / m.step_time_s, per_unit, m)

    def fixed_bytes(self, net: Network) -> int:
        """Weights, gradients and optimizer momentum of ``net`` (fp32): memory that does not grow with the patch."""
        key = json.dumps(asdict(net))
        if key not in self._params:
            import torch

            from autoseg.nets import build_network, count_parameters

            with torch.device("meta"):
                self._params[key] = count_parameters(build_network(net, self.req.in_channels,
                                                                   self.req.num_classes, self.req.ndim))
        return 3 * 4 * self._params[key]


def choose_precision(device: DeviceInfo, req: FitRequest, tp: Throughput, net: Network,
                     topo: Topology, log: list[str]) -> tuple[str, bool, float]:
    """CPU: measure fp32 against bf16 autocast with channels-last; keep bf16 when it is faster and its
    gradient error (against fp32, same weights and batch) is well below the difference between the
    gradients of two batches, the noise SGD trains through anyway. CUDA: bf16 when supported, else fp16
    AMP. MPS: fp32."""
    if device.type == "cuda":
        return ("bf16" if device.bf16 else "fp16"), False, 1.0
    if device.type != "cpu" or not device.bf16:
        return "fp32", False, 1.0
    proxy = tp.proxy(topo.patch_size, topo.divisor)
    degenerate = _bottleneck_voxels(proxy, topo.divisor) < MIN_BOTTLENECK_VOXELS  # judged on another patch
    m32, m16 = tp.measure_precisions(net, topo, spread=not degenerate)
    fps32, fps16 = m32.flops / m32.step_time_s, m16.flops / m16.step_time_s
    if degenerate:
        noise, cosine, where = _precision_noise(req, topo, proxy, tp.store)
    else:
        noise, cosine, where = _noise(m32, m16), m16.grad_cosine, ""
    log.append(f"precision: fp32 {m32.step_time_s:.3f}s vs bf16+channels-last {m16.step_time_s:.3f}s "
               f"per proxy step; bf16 gradient error {noise:.2f}x the batch-to-batch spread "
               f"(cosine to fp32 {cosine:.4f}{where})")
    if fps16 > BF16_MIN_SPEEDUP * fps32 and noise <= MAX_PRECISION_NOISE:
        return "bf16", True, fps16 / fps32
    return "fp32", False, 1.0


def _bottleneck_voxels(patch: list[int], divisor: list[int]) -> int:
    return int(np.prod([p // d for p, d in zip(patch, divisor)]))


def _precision_noise(req: FitRequest, topo: Topology, proxy: list[int],
                     store: measurements.Store | None) -> tuple[float, float, str]:
    """(gradient error / batch spread, cosine, where) of bf16 against fp32, judged on the network built for the
    proxy patch itself (the rules' topology there: fewer stages, every pooled axis keeps 4+ voxels), at the
    narrowest width, its error scaled by the stage ratio x ``JUDGE_DEPTH_MARGIN``. Untimed: only the gradients
    count here. Why not on the proxy of the deep network: its bottleneck can be 2 voxels an axis, and instance
    norm over 2 values turns any rounding into a sign flip, so the judgement there says nothing about training
    at the real patch. bf16's error adds up layer by layer, roughly in proportion to the stages (at most 1.18x
    the stage ratio on the synthetic tasks, hence the margin); see benchmarks/results/plan.md."""
    shallow = topology(req.spacing, proxy)
    net = make_network(req.family, shallow, WIDTHS[-1], req.feature_cap, _blocks(req, shallow), req.decoder_convs)
    m32, m16 = measurements.measure_precisions(store, net, req.in_channels, req.num_classes, req.ndim,
                                               shallow.patch_size, MIN_BATCH, timed=False)
    depth = max(1.0, JUDGE_DEPTH_MARGIN * topo.n_stages / shallow.n_stages)
    where = (f"; on {'x'.join(map(str, shallow.patch_size))} at width {WIDTHS[-1]} with {shallow.n_stages} stages, "
             f"x{depth:.2f} for {topo.n_stages}: the proxy's bottleneck is too small")
    return _noise(m32, m16) * depth, m16.grad_cosine, where


def _noise(m32: StepMeasurement, m16: StepMeasurement) -> float:
    """bf16's gradient error as a share of fp32's batch-to-batch spread; infinite when bf16's gradient is not
    finite (it can overflow on small patches), which refuses bf16."""
    if not math.isfinite(m16.grad_error):
        return math.inf
    return m16.grad_error / max(m32.batch_spread, 1e-12)


class Calibration:
    """Measured step time / predicted, per width. A width not measured gets the square root of a pessimistic
    correction (the small proxy of a narrow network is more overhead-bound than a wide one's, so a narrow
    width's pessimism overstates a wider one's) and all of an optimistic one (safe).
    ``bold``: all of a pessimistic one too, for a search whose choice will be measured before it is kept."""

    def __init__(self):
        self.factors: dict[int, float] = {}
        self.last = 1.0
        self.bold = False

    def correct(self, width: int, error: float) -> None:
        self.factors[width] = self(width) * error
        self.last = self.factors[width]

    def __call__(self, width: int) -> float:
        if width in self.factors:
            return self.factors[width]
        return self.last if self.last > 1 or self.bold else self.last ** 0.5


def _predict(tp: Throughput, net: Network, topo: Topology, patch: list[int], batch: int, precision: str,
             channels_last: bool) -> tuple[float, float, float]:
    """(seconds per step, bytes, flops) predicted from the proxy measurement of this width."""
    r = tp.req
    fps, per_unit, _ = tp.measure(net, topo, precision, channels_last)
    flops = compute.count_step_flops(net, r.in_channels, r.num_classes, r.ndim, patch, batch)
    mem = per_unit * np.prod(patch) * batch * net.features[0] + tp.fixed_bytes(net)
    return flops / fps, float(mem), flops


def _search(req: FitRequest, device: DeviceInfo, tp: Throughput, prec: tuple[str, bool], t_max: float,
            calibration: Calibration) -> tuple[Network, Topology, float, float] | None:
    """The first candidate, in the order things are given up, predicted to fit time and memory."""
    for phase in ("above_object", "below_object"):
        floor = req.object_patch if phase == "above_object" else min_patch(req)
        for width in (WIDTHS if phase == "above_object" else WIDTHS[-1:]):
            patch = list(req.ideal_patch)
            while patch is not None:
                topo = topology(req.spacing, patch)
                net = make_network(req.family, topo, width, req.feature_cap, _blocks(req, topo), req.decoder_convs)
                t, mem, _ = _predict(tp, net, topo, topo.patch_size, MIN_BATCH, *prec)
                t *= calibration(width)
                if t <= t_max and mem <= device.memory_bytes:
                    return net, topo, t, mem
                patch = shrink_patch(topo.patch_size, req.median_shape, topo.divisor, floor)
    return None


def min_patch(req: FitRequest) -> list[int]:
    """Below this a patch sees too little to learn from: 16 voxels an axis, or the image when smaller."""
    return [min(16, m) for m in req.median_shape]


def _smallest(req: FitRequest) -> tuple[Network, Topology]:
    topo = topology(req.spacing, [min(p, 16) for p in req.ideal_patch])
    return make_network(req.family, topo, WIDTHS[-1], req.feature_cap, _blocks(req, topo), req.decoder_convs), topo


def fit(req: FitRequest, device: DeviceInfo, verify: bool = True,
        store: measurements.Store | None = None) -> FitResult:
    """Choose width, patch and batch for ``req`` on ``device``.

    Candidates are predicted from proxy measurements (one small patch per width and precision). With
    ``verify`` the choice is then measured for real (on a CPU at half a batch of 4 or more, scaled), unless on a CPU one
    step would take longer than ``REAL_MEASURE_MAX_S``, or the choice is the largest setup and fits with room
    to spare (a real step costs seconds there and could change nothing but the batch).

    A measurement that proves the prediction wrong, too optimistic by > 25 % (or over the step-time limit)
    or too pessimistic by > 1/``PESSIMISM``, re-runs the search with the error corrected (:class:`Calibration`)
    and measures its choice once more, unless it is the width just measured at a patch at least as large
    (the corrected prediction holds there) or its corrected prediction keeps 25 % below the limit; the last
    measured choice that keeps to the limit stands. Configurations that are not trained by default are
    planned from the proxies alone (the trainer re-fits the step count to its measured pace anyway). ``store``
    keeps and reads back this machine's step measurements (:mod:`autoseg.plan.measurements`)."""
    log: list[str] = []
    t_max = req.run_seconds / req.min_steps
    tp = Throughput(device, req, store)
    topo = topology(req.spacing, req.ideal_patch)  # precision is compared on a proxy of the ideal network
    net = make_network(req.family, topo, WIDTHS[0], req.feature_cap, _blocks(req, topo), req.decoder_convs)
    precision, cl, speedup = req.precision or choose_precision(device, req, tp, net, topo, log)
    calibration, verified = Calibration(), None  # verified: the last measured choice within the limit
    choice, measured_at, mem_calibration = None, None, 1.0
    for attempt in range(MAX_REAL_MEASUREMENTS):
        found = _search(req, device, tp, (precision, cl), t_max, calibration)
        if found is None:
            net, topo = _smallest(req)
            t, mem, _ = _predict(tp, net, topo, topo.patch_size, MIN_BATCH, precision, cl)
            found = (net, topo, t * calibration(net.features[0]), mem)
            log.append("no candidate reaches the target steps in this budget: smallest network chosen")
        net, topo, t, mem = found
        batch = _grow_batch(req, device, t, mem, t_max, topo.patch_size)
        t_pred, mem_pred, flops = _predict(tp, net, topo, topo.patch_size, batch, precision, cl)
        t_pred *= calibration(net.features[0])
        choice = (net, topo, batch, t_pred, mem_pred, flops, True)
        if not verify or (t_pred > REAL_MEASURE_MAX_S and device.type == "cpu"):
            break
        if attempt == 0 and device.type == "cpu" and _is_largest(req, net, topo) \
                and t_pred <= t_max and mem_pred <= 0.5 * device.memory_bytes:
            log.append("the largest setup fits by the proxies' prediction: not measured for real (a measurement "
                       "could only grow the batch; the trainer paces its steps to the time it measures)")
            break
        if verified is not None and (net, topo.patch_size, batch) == verified[:3]:
            break  # the corrected search chose what was measured already
        if measured_at is not None and not calibration.bold:
            # corrected by a measurement of this width at a patch at least as large (FLOP/s only grows with the
            # patch), or with room for the error of carrying the correction to another width: keep it
            same = net.features[0] == measured_at[0] and np.prod(topo.patch_size) >= measured_at[1]
            fixed = tp.fixed_bytes(net)
            mem_corrected = fixed + (mem_pred - fixed) * mem_calibration
            if same or (t_pred <= t_max / 1.25 and mem_corrected <= 0.5 * device.memory_bytes):
                choice = (net, topo, batch, t_pred, mem_corrected, flops, True)
                log.append(f"width {net.features[0]}, patch {topo.patch_size}: predicted, corrected by the measurement")
                break
        # on a CPU a step's time and activations grow linearly with the batch from 2 samples on, so half a batch
        # of 4 or more tells in half the time; not below: a batch of 1 takes other kernels, for small fp32
        # networks slower ones (width 8, 48^3: 0.84 s at batch 1, 0.43 s at batch 2; width 32: 0.97 / 1.78 s)
        batch_m = batch // 2 if device.type == "cpu" and batch >= 2 * HALF_BATCH_MIN else batch
        # with a measured choice to fall back on, a setup whose warm-up alone shows it over the limit is not timed
        # further: a full timing could only confirm that it does not fit
        give_up = WARMUP_BOUND * 1.25 * t_max * batch_m / batch if verified and device.type == "cpu" else None
        m = measurements.measure(store, net, req.in_channels, req.num_classes, req.ndim, topo.patch_size, batch_m,
                                 device.type, precision, cl, give_up_s=give_up)
        gave_up = give_up is not None and m.step_time_s > give_up
        measured_at = (net.features[0], np.prod(topo.patch_size))
        fixed = tp.fixed_bytes(net)
        m.step_time_s *= batch / batch_m
        m.peak_memory_bytes = int(fixed + max(m.peak_memory_bytes - fixed, 0) * batch / batch_m)
        mem_calibration = (m.peak_memory_bytes - fixed) / max(mem_pred - fixed, 1.0)
        error = m.step_time_s / max(t_pred, 1e-9)
        at = "" if batch_m == batch else f" (from batch {batch_m})"
        if gave_up:
            at += " (its warm-up step: over the limit, not timed further)"
        log.append(f"predicted {t_pred:.3f}s/step, measured {m.step_time_s:.3f}s{at}; "
                   f"predicted {mem_pred / compute.MiB:.0f} MiB, measured {m.peak_memory_bytes / compute.MiB:.0f} MiB")
        fits = m.step_time_s <= 1.25 * t_max and m.peak_memory_bytes <= device.memory_bytes
        choice = (net, topo, batch, m.step_time_s, float(m.peak_memory_bytes), flops, False)
        if fits:
            verified = (net, topo.patch_size, batch, choice)
        if fits and PESSIMISM <= error <= 1.25:
            break
        calibration.correct(net.features[0], error)
        # a narrower network than the widest, measured faster than predicted and within the limit: the square
        # root of the correction could keep the search from wider ones that fit too. Carry all of it, and
        # measure what that search chooses; if it overshoots, the setup measured first stands
        last = attempt + 1 >= MAX_REAL_MEASUREMENTS
        calibration.bold = fits and error < PESSIMISM and net.features[0] < WIDTHS[0] and not last
        if not last:
            log.append(f"measured {m.step_time_s:.3f}s/step, {error:.2f}x the prediction: searching again"
                       + (" (the correction carried in full to wider networks, their choice measured)"
                          if calibration.bold else ""))
    if verified is not None and choice is not None and not choice[6] and choice is not verified[3]:
        if not (choice[3] <= 1.25 * t_max and choice[4] <= device.memory_bytes):
            choice = verified[3]  # the corrected search overshot: keep the choice that was measured to fit
    net, topo, batch, t_pred, mem_pred, flops, extrapolated = choice
    steps = max(1, int(req.run_seconds / max(t_pred, 1e-6)))
    params = tp.fixed_bytes(net) // 12
    measured = Measurement(round(t_pred, 4), round(mem_pred / compute.MiB, 1), int(params),
                           round(flops / 1e9, 2), round(speedup, 2), extrapolated)
    log.append(f"width {net.features[0]}, patch {topo.patch_size}, batch {batch}: "
               f"{t_pred:.3f}s/step{' (predicted)' if extrapolated else ''}, limit {t_max:.3f}s/step")
    return FitResult(net, topo.patch_size, batch, precision, cl, measured, steps, log, (precision, cl, speedup))


def _is_largest(req: FitRequest, net: Network, topo: Topology) -> bool:
    """The first candidate of the search order: the widest network at the ideal patch."""
    return net.features[0] == WIDTHS[0] and topo.patch_size == topology(req.spacing, req.ideal_patch).patch_size


def _blocks(req: FitRequest, topo: Topology) -> list[int]:
    if req.blocks is not None:
        return (req.blocks + [req.blocks[-1]] * topo.n_stages)[: topo.n_stages]
    return [2] * topo.n_stages


def _grow_batch(req: FitRequest, device: DeviceInfo, t: float, mem: float, t_max: float, patch: list[int]) -> int:
    """Use spare memory and time for a larger batch, capped at 5% of the dataset's voxels per step."""
    per_sample_t, per_sample_mem = t / MIN_BATCH, mem / MIN_BATCH
    by_time = math.floor(t_max / max(per_sample_t, 1e-9))
    by_mem = math.floor(device.memory_bytes / max(per_sample_mem, 1.0))
    by_data = math.floor(0.05 * req.dataset_voxels / np.prod(patch))
    return int(max(MIN_BATCH, min(by_time, by_mem, max(by_data, MIN_BATCH), req.max_batch)))
