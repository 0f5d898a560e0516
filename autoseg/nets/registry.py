"""The network registry: ``@NETWORKS.register("unet")`` on a builder ``(network_cfg, in_channels,
num_classes, ndim) -> nn.Module``; plans.json names it in ``network.family``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from autoseg.schema.plans import NETWORK_FAMILIES, Network
from autoseg.schema.registry import Registry

NetworkBuilder = Callable[[Network, int, int, int], nn.Module]
NETWORKS: Registry[NetworkBuilder] = Registry("network family", NETWORK_FAMILIES)


def build_network(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    """Build the network a plan describes; ``num_classes`` counts background."""
    return NETWORKS[cfg.family](cfg, in_channels, num_classes, ndim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
