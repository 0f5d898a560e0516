"""Multi-GPU / multi-node training with DDP under ``torchrun``; a no-op single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


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

    @classmethod
    def start(cls, device: str | None = None) -> DistContext:
        """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or run alone."""
        from autoseg.plan.compute import best_device

        world = int(os.environ.get("WORLD_SIZE", "1"))
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
            tdist.init_process_group("nccl" if kind == "cuda" else "gloo")
        return cls(rank, world, local, dev, True)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world <= 1:
            return model
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast_int(self, value: int) -> int:
        if self.world <= 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
        tdist.broadcast(t, 0)
        return int(t.item())

    def stop(self) -> None:
        if self.started and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
            self.started = False
