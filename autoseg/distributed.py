"""Multi-GPU / multi-node training with DDP under ``torchrun``; a no-op single process otherwise.

The process group is joined once per process and kept until the process exits: ``autoseg train`` runs
several (configuration, fold) runs in one process, and a gloo group destroyed and created again under
the same torchrun rendezvous reads its peers' stale addresses and fails to connect. Rank 0 alone writes
and predicts the held-out cases between runs, so the others wait at the next collective; the group's
timeout is long enough for that wait (:data:`PROCESS_GROUP_TIMEOUT`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

PROCESS_GROUP_TIMEOUT = timedelta(hours=2)  # covers rank 0's out-of-fold prediction between two runs


def world_size() -> int:
    """Processes in the torchrun job (1 outside torchrun): torchrun says so in the environment."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes files and reports."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    started: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return tdist.get_backend() if self.started else "none"

    @classmethod
    def start(cls, device: str | None = None) -> DistContext:
        """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or run alone.
        A group this process already joined (an earlier run) is reused."""
        from autoseg.device import best_device

        world = world_size()
        kind = (device or best_device()).split(":")[0]
        if world <= 1:
            return cls(0, 1, 0, torch.device(device or best_device()))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if kind == "cuda":
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device(kind)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
            atexit.register(_destroy)
        return cls(rank, world, local, dev, True)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world <= 1:
            return model
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _tensor(self, value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([value], dtype=dtype, device=self.device if self.device.type == "cuda" else "cpu")

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. the total steps re-derived from rank 0's timing)."""
        if self.world <= 1:
            return value
        t = self._tensor(value, torch.long)
        tdist.broadcast(t, 0)
        return int(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (e.g. the training loss of the whole global batch)."""
        if self.world <= 1:
            return value
        t = self._tensor(value, torch.float64)
        tdist.all_reduce(t)
        return float(t.item()) / self.world

    def stop(self) -> None:
        """End of a run: wait until every rank got here (rank 0 last wrote the checkpoint and the log). The
        group itself stays for the next run and is left at exit."""
        if self.started and tdist.is_initialized():
            tdist.barrier()


def _destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
