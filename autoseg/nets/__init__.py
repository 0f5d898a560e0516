"""Networks built from the plan, looked up by name.

Adding a family is one decorated builder ``(network_cfg, in_channels, num_classes, ndim) -> nn.Module``;
plans.json names it in ``network.family``. Every network takes ``(B, C, *spatial)`` and returns logits at
input resolution; in training mode with deep supervision it returns a list, full resolution first.
"""

from __future__ import annotations

from autoseg.nets import deeplab as _deeplab  # noqa: F401  (registers "deeplabv3plus")
from autoseg.nets import fcn as _fcn  # noqa: F401  (registers "fcn")
from autoseg.nets import maskrcnn as _maskrcnn  # noqa: F401  (registers "maskrcnn"; torchvision on first use)
from autoseg.nets import unet as _unet  # noqa: F401  (registers the U-Net families)
from autoseg.nets.registry import NETWORKS, build_network, count_parameters, layout_mismatch, layout_of
from autoseg.nets.summary import describe, training_outputs

__all__ = ["NETWORKS", "build_network", "count_parameters", "describe", "layout_mismatch", "layout_of",
           "training_outputs"]
