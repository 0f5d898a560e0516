"""Networks built from the plan, looked up by name.

Adding a family is one decorated builder ``(network_cfg, in_channels, num_classes, ndim) -> nn.Module``;
plans.json names it in ``network.family``. Every network takes ``(B, C, *spatial)`` and returns logits at
input resolution; in training mode with deep supervision it returns a list, full resolution first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autoseg.plan.model import Network

NetworkBuilder = Callable[[Network, int, int, int], nn.Module]
NETWORKS: dict[str, NetworkBuilder] = {}


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    def deco(fn: NetworkBuilder) -> NetworkBuilder:
        NETWORKS[name] = fn
        return fn
    return deco


def build_network(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    """Build the network a plan describes; ``num_classes`` counts background."""
    try:
        builder = NETWORKS[cfg.family]
    except KeyError:
        raise ValueError(f"unknown network family '{cfg.family}' (known: {', '.join(sorted(NETWORKS))})") from None
    return builder(cfg, in_channels, num_classes, ndim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...], backward: bool = True) -> float:
    """FLOPs of one forward (and backward) pass on ``input_shape`` (B, C, *spatial), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(input_shape)
    was_training = model.training
    model.train(backward)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            loss = sum(o.float().sum() for o in (out if isinstance(out, (list, tuple)) else [out]))
            loss.backward()
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


from autoseg.nets import deeplab as _deeplab  # noqa: E402,F401  (registers "deeplabv3plus")
from autoseg.nets import fcn as _fcn  # noqa: E402,F401  (registers "fcn")
from autoseg.nets import unet as _unet  # noqa: E402,F401  (registers the U-Net families)
from autoseg.nets.summary import describe, training_outputs  # noqa: E402,F401  (cost, output count)
