"""Training checkpoints: tensors and plain values only, written atomically, loaded without pickle.

``torch.load(..., weights_only=True)`` refuses arbitrary objects, so opening a checkpoint never runs code.
A checkpoint holds the model and optimizer state, the step and the run's bookkeeping; batches are a pure
function of (seed, step), so nothing else is needed for a resumed run to continue exactly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from autoseg.artifacts import atomic_write_bytes
from autoseg.errors import UserError
from autoseg.schema.plans import Network


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, step: int, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "step": step, "state": state, "torch_rng": torch.get_rng_state()}, buf)
    atomic_write_bytes(buf.getvalue(), path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it to start the run over") from e


def read_progress(path: Path) -> dict[str, Any]:
    """A checkpoint's ``step``, ``total_steps``, ``finished`` and ``elapsed_s``, its tensors memory-mapped rather
    than read (cheap on a large checkpoint: ``autoseg status``, a finished run another worker trained)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = ck.get("state") or {}
        return {"step": int(ck["step"]), "total_steps": int(state.get("total_steps", ck["step"])),
                "finished": bool(state.get("finished")), "elapsed_s": float(state.get("elapsed_s", 0.0))}
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__})") from e


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP / compiled wrappers (whose state_dict keys are prefixed)."""
    return getattr(model, "module", model)


def load_weights(path: Path, network: Network, in_channels: int, num_classes: int, ndim: int
                 ) -> dict[str, torch.Tensor]:
    """The network weights of the checkpoint at ``path``, once held against the network the plan describes: a
    checkpoint that does not fit it (plans.json edited after training, a file from another run) is one line
    naming the file, not a ``load_state_dict`` traceback when the first case is predicted."""
    from autoseg.nets import layout_mismatch, layout_of

    state = load_checkpoint(path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{path}: not an autoseg checkpoint (no network weights); delete it to start the run over")
    problem = layout_mismatch(network, in_channels, num_classes, ndim, layout_of(weights))
    if problem:
        raise UserError(f"{path}: its weights do not fit the network plans.json describes ({problem}); "
                        "was plans.json edited after training? Restore it, or train again")
    return weights
