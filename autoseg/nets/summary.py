"""What a network costs, counted without computing: parameters and FLOPs per patch.

Everything runs on the meta device (shapes only, no memory, no arithmetic), so describing a 3D network at a
full patch takes milliseconds on any machine and the search can rank candidates by cost before training any.
"""

from __future__ import annotations

import torch

from autoseg.schema.plans import Network


def describe(cfg: Network, in_channels: int, num_classes: int, ndim: int, patch: list[int] | tuple[int, ...],
             batch: int = 1) -> dict:
    """Parameters, forward FLOPs (inference, eval mode) and training-step FLOPs (forward with the
    deep-supervision heads + backward) for ``batch`` patches of size ``patch``.

    >>> describe(Network(features=[8, 16], kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]]),
    ...          1, 2, 2, [32, 32])["parameters"]
    6562
    """
    from torch.utils.flop_counter import FlopCounterMode

    from autoseg.nets.registry import build_network, count_parameters

    if len(patch) != ndim:
        raise ValueError(f"patch {list(patch)} has {len(patch)} axes, the network is {ndim}D")
    with torch.device("meta"):
        model = build_network(cfg, in_channels, num_classes, ndim)
        x = torch.empty(batch, in_channels, *patch)
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            out = model.train()(x)
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.sum() for o in outs).backward()
        step = counter.get_total_flops()
        output_shapes = [list(o.shape) for o in outs]
    return {"family": cfg.family, "parameters": count_parameters(model), "forward_flops": float(forward),
            "train_step_flops": float(step), "train_output_shapes": output_shapes,
            "patch": list(patch), "batch": batch}


def training_outputs(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> int:
    """How many logits the network returns in training mode (1 without deep supervision): the number of
    deep-supervision weights the loss needs. Families differ (the U-Net gives ``n_stages - 1``, FCN up to 3,
    DeepLab 2), so ask the network, on the meta device at the smallest valid patch, instead of a formula."""
    from autoseg.nets.registry import build_network

    divisor = [1] * ndim
    for s in cfg.strides:
        divisor = [a * b for a, b in zip(divisor, s)]
    with torch.device("meta"):
        model = build_network(cfg, in_channels, num_classes, ndim)
        if getattr(model, "trains_on_targets", False):  # returns its own loss terms (Mask R-CNN)
            return 1
        out = model.train()(torch.empty(1, in_channels, *(2 * d for d in divisor)))  # > 1 voxel at the bottleneck
    return len(out) if isinstance(out, (list, tuple)) else 1
