"""Measured compute: step time and peak memory of a real forward/backward/optimizer step on the device.

The planner never guesses memory from feature-map counts: it runs the candidate network. Large
candidates on slow devices are measured on a smaller proxy patch and extrapolated by FLOPs (counted
exactly from the shapes each convolution sees) — the extrapolation is marked in the plan.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from autoseg.device import sync
from autoseg.nets import build_network
from autoseg.schema.plans import Network

MiB = 1 << 20
QUICK_STEPS_S = 0.15  # after the one required timed step, keep timing while all timed steps took less than this


@dataclass
class StepMeasurement:
    step_time_s: float
    peak_memory_bytes: int
    flops: float
    precision: str
    channels_last: bool
    grad_cosine: float = 1.0  # agreement of the first step's gradient with fp32 (precision check)
    grad_error: float = 0.0  # |gradient - reference gradient| (same weights, same batch)
    batch_spread: float = 0.0  # |gradient of another batch - this gradient| (same weights): SGD's own noise


def count_step_flops(cfg: Network, in_ch: int, n_classes: int, ndim: int, patch: list[int], batch: int) -> float:
    """FLOPs of forward + backward. Convolution FLOPs are linear in the voxels of a patch divisible by the
    network's total stride, so they are counted once per network (exact: from the shapes each convolution sees)
    at the smallest such patch, and scaled."""
    divisor = [1] * ndim
    for s in cfg.strides:
        divisor = [a * b for a, b in zip(divisor, s)]
    key = json.dumps([asdict(cfg), in_ch, n_classes, ndim])
    ref = (2 * divisor[0], *divisor[1:])  # two voxels at the bottleneck: instance norm needs more than one
    return _flops_at(key, ref) * batch * math.prod(patch) / math.prod(ref)


@functools.lru_cache(maxsize=256)
def _flops_at(key: str, patch: tuple[int, ...]) -> float:
    """Convolution FLOPs of one forward + backward at ``patch``, batch 1, as torch's FlopCounterMode counts them
    (forward, input gradient unless the input needs none, weight gradient), from the shapes each convolution
    sees. The shapes come from a forward at this small patch of the network built on the meta device (no
    weights), in which every convolution only returns zeros of its output's shape and norms and activations
    pass their input on: what is left (skips, pooling, resizing) is cheap. The planner counts tens of
    networks; a real forward took 0.15 s per 30 M-parameter network, the meta device alone imports
    torch._dynamo for its concatenation (1.7 s)."""
    net, in_ch, n_classes, ndim = json.loads(key)
    with torch.device("meta"):
        model = build_network(Network(**net), in_ch, n_classes, ndim).train()
    total, grad_source = 0.0, torch.zeros((), requires_grad=True)

    def shape_only(mod: nn.modules.conv._ConvNd):
        def forward(x: torch.Tensor, *args) -> torch.Tensor:
            nonlocal total
            out = x.new_zeros(x.shape[0], mod.out_channels, *_conv_out(mod, x.shape[2:]))
            k = math.prod(mod.kernel_size)
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                forward_flops = 2.0 * x.numel() * (mod.out_channels // mod.groups) * k
            else:
                forward_flops = 2.0 * out.numel() * (mod.in_channels // mod.groups) * k
            total += forward_flops * (3 if x.requires_grad else 2)
            return out + grad_source  # needs its input gradient, as after a real conv (and is no leaf: in-place ok)

        return forward

    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.forward = shape_only(m)
        elif isinstance(m, _SHAPE_KEEPING):
            m.forward = _passthrough
    model(torch.zeros(1, in_ch, *patch))
    return total


_SHAPE_KEEPING = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LeakyReLU, nn.ReLU, nn.GELU,
                  nn.Dropout, nn.modules.dropout._DropoutNd)


def _passthrough(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def _conv_out(mod: nn.modules.conv._ConvNd, size: torch.Size) -> list[int]:
    """The spatial output size of a convolution (torch's formulas; numeric padding, as autoseg's nets use)."""
    k, s, p, d = mod.kernel_size, mod.stride, mod.padding, mod.dilation
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return [(n - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + mod.output_padding[i] + 1 for i, n in enumerate(size)]
    return [(n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate(size)]


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of distinct tensors autograd keeps for the backward pass."""

    def __init__(self):
        self.bytes, self._seen = 0, set()

        def pack(t: torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.dtype)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)


class _MomentumSGD:
    """Nesterov momentum SGD as the trainer steps it, without ``torch.optim``: constructing a torch optimizer
    imports torch._dynamo (1.7 s here), longer than the steps the planner times."""

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-2, momentum: float = 0.99, scale: float = 1.0):
        self.params, self.lr, self.momentum, self.scale = params, lr, momentum, scale
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs):
            if p.grad is None:
                continue
            if self.scale != 1.0:  # fp16: unscale, as a GradScaler does
                p.grad.div_(self.scale)
            buf.mul_(self.momentum).add_(p.grad)
            p.add_(p.grad.add(buf, alpha=self.momentum), alpha=-self.lr)
            p.grad = None


def _first_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])


def _other_batch_grad(model: nn.Module, batch: int, in_ch: int, n_classes: int, patch: list[int],
                     dev: torch.device, fmt: torch.memory_format, seed: int, amp_dtype) -> float:
    """|gradient of a second random batch - the current gradient|, at the current weights."""
    first = _first_grad(model).cpu()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_ch, *patch, generator=g).to(dev).to(memory_format=fmt)
    y = torch.randint(0, n_classes, (batch, *patch), generator=g).to(dev)
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = nn.functional.cross_entropy(outs[0].float(), y)
        for o in outs[1:]:
            loss = loss + 0.5 * o.float().square().mean()
    loss.backward()
    return float((_first_grad(model).cpu() - first).norm())


def measure_step(cfg: Network, in_ch: int, n_classes: int, ndim: int, patch: list[int], batch: int,
                 device: str = "cpu", precision: str = "fp32", channels_last: bool = False, steps: int = 1,
                 reference_grad: torch.Tensor | None = None, seed: int = 0,
                 second_batch: bool = False, give_up_s: float | None = None) -> tuple[StepMeasurement, torch.Tensor]:
    """Run ``1 + steps`` real training steps (the first is warm-up; more while they are quick) and return the
    fastest timed step, the peak memory above the baseline, and the first step's gradient (for comparing
    precisions). ``second_batch``: also the gradient of another random batch at the same weights, whose
    distance (``batch_spread``) is the noise SGD lives with anyway: the yardstick for a precision's error.
    ``steps=0``: the first step only, for its gradient (its time, a warm-up's, is no step time to plan by).
    ``give_up_s``: stop after the warm-up when it took longer than this, and return its time: for a setup that
    only matters if it is faster (on a CPU a warm-up took 1.07-1.12x a timed step at planning sizes)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_network(cfg, in_ch, n_classes, ndim).to(dev).train()
    fmt = (torch.channels_last_3d if ndim == 3 else torch.channels_last) if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    scale = 2.0 ** 10 if precision == "fp16" else 1.0  # a fixed loss scale: the cost of a GradScaler's
    opt = _MomentumSGD(list(model.parameters()), scale=scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_ch, *patch, generator=g).to(dev).to(memory_format=fmt)
    y = torch.randint(0, n_classes, (batch, *patch), generator=g).to(dev)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times, grad = [], None
    i = 0
    # at least ``steps`` timed steps after the warm-up, more (up to 8) while they are quick: on a shared
    # machine noise only ever adds time, so the minimum of several short steps is the honest number
    while i < 1 + steps or (steps and i < 9 and sum(times[1:]) < QUICK_STEPS_S):
        sync(dev)
        t0 = time.perf_counter()
        saved = _SavedBytes() if dev.type != "cuda" and i == 0 else contextlib.nullcontext()
        with saved, torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
            outs = out if isinstance(out, (list, tuple)) else [out]
            loss = nn.functional.cross_entropy(outs[0].float(), y)
            for o in outs[1:]:  # deep supervision heads: a cheap stand-in target
                loss = loss + 0.5 * o.float().square().mean()
        (loss * scale if scale != 1.0 else loss).backward()
        if i == 0:
            grad = _first_grad(model).cpu()
            if second_batch:
                spread = _other_batch_grad(model, batch, in_ch, n_classes, patch, dev, fmt, seed, amp_dtype)
        opt.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        if i == 0 and dev.type != "cuda":
            # CPU/MPS allocators keep no peak statistics: count what autograd saves for backward (the
            # activations that dominate training memory) plus weights, gradients and momentum.
            activations = saved.bytes
        i += 1
        if i == 1 and give_up_s is not None and times[0] > give_up_s:
            break
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = activations + 3 * params + 2 * x.numel() * x.element_size()
    cosine, error = 1.0, 0.0
    if reference_grad is not None and grad is not None and reference_grad.shape == grad.shape:
        cosine = float(nn.functional.cosine_similarity(reference_grad, grad, dim=0))
        error = float((grad - reference_grad).norm())
    # the minimum is the honest number on a shared machine: noise only ever adds time
    m = StepMeasurement(min(times[1:] or times), int(peak), 0.0, precision, channels_last, cosine, error,
                        spread if second_batch else 0.0)
    del model, opt, x, y
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return m, grad
