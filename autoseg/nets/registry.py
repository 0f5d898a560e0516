"""The network registry: ``@NETWORKS.register("unet")`` on a builder ``(network_cfg, in_channels,
num_classes, ndim) -> nn.Module``; plans.json names it in ``network.family``. And whether a set of weights
is the one a plan's network takes (:func:`layout_mismatch`), checked on the ``meta`` device: no memory."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from autoseg.schema.plans import NETWORK_FAMILIES, Network
from autoseg.schema.registry import Registry

NetworkBuilder = Callable[[Network, int, int, int], nn.Module]
NETWORKS: Registry[NetworkBuilder] = Registry("network family", NETWORK_FAMILIES)


def build_network(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    """Build the network a plan describes; ``num_classes`` counts background. Its outputs are the classes
    and then ``cfg.instance_outputs`` channels (the interior of each object, for the touching-object split)."""
    return NETWORKS[cfg.family](cfg, in_channels, num_classes + cfg.instance_outputs, ndim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


Layout = Mapping[str, tuple[str, Sequence[int]]]  # tensor name -> (dtype name, e.g. "float32"; shape)


def layout_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The names, dtypes and shapes of a state_dict's tensors (what :func:`layout_mismatch` compares)."""
    return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}


def layout_mismatch(cfg: Network, in_channels: int, num_classes: int, ndim: int, layout: Layout) -> str | None:
    """Why weights laid out as ``layout`` cannot be loaded into the network the plan describes (what
    ``load_state_dict`` would refuse: a missing or unexpected tensor name, another shape; or another dtype),
    or None. The network is built on the ``meta`` device: its tensors have shapes but no memory, so a plan
    asking for a huge network costs nothing here."""
    with torch.device("meta"):
        expected = layout_of(build_network(cfg, in_channels, num_classes, ndim).state_dict())
    missing = [k for k in expected if k not in layout]
    unexpected = [k for k in layout if k not in expected]
    if missing or unexpected:
        parts = [f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        return f"its tensor names are not the network's ({'; '.join(parts)})"
    for key, (dtype, shape) in expected.items():
        got_dtype, got_shape = layout[key]
        if tuple(got_shape) != shape:
            return f"tensor {key} has shape {list(got_shape)}, the network's is {list(shape)}"
        if got_dtype != dtype:
            return f"tensor {key} is {got_dtype}, the network's is {dtype}"
    return None
