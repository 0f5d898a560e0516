"""FCN-8s-style network: the U-Net's plain encoder, a classifier on the coarsest features, and score maps
of the last stages upsampled and summed (skip fusion), then interpolated to the input size.

Why have it: it is the cheapest decoder there is (no convolutions at high resolution), so it is the lower
bound the search compares richer decoders against, and users of the field ask for it by name.

Deep supervision (training mode): ``[full, fused at stage n-2, score at stage n-1]`` — each extra output is
at the resolution of an encoder stage, so a loss that resizes the target to each output's shape serves it.
The fused map of the finest fused stage is not listed separately: the full output is that map, upsampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.nets.blocks import ConvNormAct, conv_cls
from autoseg.nets.registry import NETWORKS
from autoseg.nets.unet import PlainEncoder
from autoseg.schema.plans import Network

FUSED_STAGES = 3  # FCN-8s: the coarsest stage and the two before it (total strides 32, 16, 8 in 2D)


def upsample(x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """(Bi/tri)linear resize to ``size``; a no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class FCN(nn.Module):
    """Plain encoder; ``classifier`` on the bottleneck (FCN's fc6/fc7 as a conv and a 1x1), 1x1 ``scores``
    on the stages before it; coarse-to-fine: upsample, add the next stage's score map."""

    def __init__(self, ndim: int, cfg: Network, in_channels: int, num_classes: int,
                 fused_stages: int = FUSED_STAGES):
        super().__init__()
        f, k = cfg.features, cfg.kernel_sizes
        self.encoder = PlainEncoder(ndim, cfg, in_channels)
        self.classifier = nn.Sequential(ConvNormAct(ndim, f[-1], f[-1], k[-1], 1, cfg.norm, cfg.nonlin),
                                        conv_cls(ndim)(f[-1], num_classes, 1))
        # stage indices whose score maps are fused, coarse to fine (n-2, n-3, ... but never below 0)
        self.fused = list(range(len(f) - 2, max(len(f) - fused_stages, 0) - 1, -1))
        self.scores = nn.ModuleList(conv_cls(ndim)(f[i], num_classes, 1) for i in self.fused)
        self.deep_supervision = cfg.deep_supervision

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = self.encoder(x)
        score = self.classifier(skips[-1])
        levels = [score]  # coarse to fine
        for i, head in zip(self.fused, self.scores):
            score = upsample(score, skips[i].shape[2:]) + head(skips[i])
            levels.append(score)
        full = upsample(score, x.shape[2:])
        if self.deep_supervision and self.training:
            return [full, *reversed(levels[:-1])] if len(levels) > 1 else [full]
        return full


@NETWORKS.register("fcn")
def build_fcn(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    return FCN(ndim, cfg, in_channels, num_classes)
