"""The device autoseg computes on: which one (CPU, CUDA, MPS), what it offers (memory, threads, bf16), and
the few device-specific steps every stage shares (a user's ``--device`` checked, synchronisation before a
timing, the precision a planned autocast runs at there).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from autoseg.errors import UserError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a planned precision -> its autocast dtype


@dataclass
class DeviceInfo:
    type: str  # cpu, cuda, mps
    name: str
    memory_bytes: int  # what training may use: GPU memory, or a share of the RAM on CPU
    threads: int
    bf16: bool  # bf16 autocast is worth measuring (CPU with AVX-512 BF16/AMX, or CUDA with bf16)

    def to_dict(self) -> dict:
        return {"type": self.type, "name": self.name, "memory_gb": round(self.memory_bytes / 2**30, 2),
                "threads": self.threads}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _available_ram() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def detect_device(requested: str | None = None) -> DeviceInfo:
    """Describe the device training will run on; ``requested`` is cpu, cuda, cuda:N or mps (default: best)."""
    kind = requested or best_device()
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {kind}: CUDA is not available on this machine (use --device cpu)")
        idx = torch.device(kind).index or 0
        props = torch.cuda.get_device_properties(idx)
        return DeviceInfo("cuda", props.name, int(props.total_memory * 0.9), torch.get_num_threads(),
                          torch.cuda.is_bf16_supported())
    if kind == "mps":
        return DeviceInfo("mps", "Apple MPS", int(_available_ram() * 0.6), torch.get_num_threads(), False)
    if kind != "cpu":
        raise UserError(f"--device {kind}: unknown device (use cpu, cuda, cuda:N or mps)")
    flags = _cpu_flags()
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    return DeviceInfo("cpu", _cpu_name(), int(_available_ram() * 0.5), torch.get_num_threads(), bf16)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` or the best available; a CUDA/MPS request on a machine without one is a user error."""
    dev = torch.device(device or best_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine (use --device cpu)")
    return dev


def precision_on(precision: str, dev: torch.device) -> str:
    """The planned precision where the device runs it: fp16 autocast on CUDA only, bf16 on CUDA and CPU."""
    if precision == "fp16" and dev.type != "cuda":
        return "fp32"
    if precision == "bf16" and dev.type == "mps":
        return "fp32"
    return precision


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
