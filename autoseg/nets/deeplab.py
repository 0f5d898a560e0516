"""DeepLabv3+-style network: residual encoder with output stride <= 16 (later strides become dilations),
atrous spatial pyramid pooling (ASPP), and a decoder that fuses a 1x1-reduced early stage.

Why have it: ASPP sees several context sizes at one resolution, a different inductive bias from the U-Net's
ladder of skips, and users of the field ask for it by name.

Anisotropy: a stride replaced by dilation multiplies the dilation of the axes it would have pooled, and
dilation only ever applies to axes whose kernel is larger than 1 (a 1xNxN kernel stays in-plane).
ASPP rates are ``(1, 2, 3)`` times the encoder's dilation per axis: the planner pools until the coarsest
map is 4-7 voxels, so rates in units of that map cover it at any patch size (DeepLab's 6/12/18 on a 33-voxel
map are the same fractions). A rate beyond the map reads zero padding, i.e. degrades to a narrower conv.

Deep supervision (training mode): ``[full, aux]``, ``aux`` being logits of the ASPP output at the output
stride (an auxiliary head, as in PSPNet); the decoder itself has a single resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.nets.blocks import ConvNormAct, ResidualBlock, conv_cls, nonlin_layer
from autoseg.nets.fcn import upsample
from autoseg.nets.registry import NETWORKS
from autoseg.schema.plans import Network

OUTPUT_STRIDE = 16  # largest total stride of any axis the encoder reaches; later strides become dilations
LOW_LEVEL_STRIDE = 4  # the decoder fuses the deepest stage at this total stride or finer
ASPP_RATES = (1, 2, 3)


def atrous(module: nn.Module, dilation: Sequence[int]) -> nn.Module:
    """Set per-axis ``dilation`` (and the matching 'same' padding) on every conv of ``module`` in place,
    only along axes whose kernel is larger than 1."""
    for conv in module.modules():
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            dil = tuple(d if k > 1 else 1 for k, d in zip(conv.kernel_size, dilation))
            conv.dilation = dil
            conv.padding = tuple((k - 1) * d // 2 for k, d in zip(conv.kernel_size, dil))
    return module


class Encoder(nn.Module):
    """Residual stages with the plan's strides until an axis would pass ``output_stride``; from then on the
    stride is folded into the dilation of the following convs. Returns every stage's output."""

    def __init__(self, ndim: int, cfg: Network, in_channels: int, output_stride: int = OUTPUT_STRIDE):
        super().__init__()
        self.stem = ConvNormAct(ndim, in_channels, cfg.features[0], cfg.kernel_sizes[0], 1, cfg.norm, cfg.nonlin)
        self.stages = nn.ModuleList()
        self.total_stride, self.dilation = [1] * ndim, [1] * ndim
        self.stage_strides: list[list[int]] = []  # total stride of each stage's output
        cin = cfg.features[0]
        for i, (f, k, s) in enumerate(zip(cfg.features, cfg.kernel_sizes, cfg.strides)):
            if max(t * a for t, a in zip(self.total_stride, s)) <= output_stride:
                self.total_stride = [t * a for t, a in zip(self.total_stride, s)]
                stride = s
            else:
                self.dilation = [d * a for d, a in zip(self.dilation, s)]
                stride = [1] * ndim
            n = cfg.blocks_per_stage[i] if cfg.blocks_per_stage else 1 + min(i, 3)
            blocks = [ResidualBlock(ndim, cin if j == 0 else f, f, k, stride if j == 0 else 1, cfg.norm, cfg.nonlin)
                      for j in range(n)]
            self.stages.append(atrous(nn.Sequential(*blocks), self.dilation))
            self.stage_strides.append(list(self.total_stride))
            cin = f

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class ImagePool(nn.Module):
    """Global context: mean over the map, 1x1 conv, broadcast back. No norm: one voxel cannot be normalized."""

    def __init__(self, ndim: int, cin: int, cout: int, nonlin: str):
        super().__init__()
        self.conv, self.act = conv_cls(ndim)(cin, cout, 1), nonlin_layer(nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        return self.act(self.conv(pooled)).expand(-1, -1, *x.shape[2:])


class ASPP(nn.Module):
    """1x1 conv, three atrous convs and image pooling in parallel, concatenated and projected by a 1x1."""

    def __init__(self, ndim: int, cin: int, cout: int, kernel: Sequence[int], dilation: Sequence[int],
                 norm: str, nonlin: str):
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(ndim, cin, cout, [1] * ndim, 1, norm, nonlin)]
        for r in ASPP_RATES:
            conv = ConvNormAct(ndim, cin, cout, kernel, 1, norm, nonlin)
            branches.append(atrous(conv, [r * d for d in dilation]))
        branches.append(ImagePool(ndim, cin, cout, nonlin))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(ndim, len(branches) * cout, cout, [1] * ndim, 1, norm, nonlin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], 1))


class DeepLabV3Plus(nn.Module):
    """Encoder -> ASPP -> upsample to the low-level stage, concat with its 1x1 reduction -> two convs ->
    1x1 classifier -> interpolate to the input size."""

    def __init__(self, ndim: int, cfg: Network, in_channels: int, num_classes: int,
                 output_stride: int = OUTPUT_STRIDE):
        super().__init__()
        f, k = cfg.features, cfg.kernel_sizes
        self.encoder = Encoder(ndim, cfg, in_channels, output_stride)
        width = min(f[-1], 8 * f[0])  # 256 for the usual 32-feature base, as in DeepLab
        low_width = max(f[0], width * 3 // 16)  # 48 for 256, as in DeepLab
        strides = self.encoder.stage_strides
        finer = [i for i in range(len(f)) if max(strides[i]) <= LOW_LEVEL_STRIDE]
        self.low = min(finer[-1], max(len(f) - 2, 0))
        self.aspp = ASPP(ndim, f[-1], width, k[-1], self.encoder.dilation, cfg.norm, cfg.nonlin)
        self.reduce = ConvNormAct(ndim, f[self.low], low_width, [1] * ndim, 1, cfg.norm, cfg.nonlin)
        self.decoder = nn.Sequential(ConvNormAct(ndim, width + low_width, width, k[self.low], 1, cfg.norm, cfg.nonlin),
                                     ConvNormAct(ndim, width, width, k[self.low], 1, cfg.norm, cfg.nonlin))
        self.classifier = conv_cls(ndim)(width, num_classes, 1)
        self.aux = conv_cls(ndim)(width, num_classes, 1) if cfg.deep_supervision else None
        self.deep_supervision = cfg.deep_supervision

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.encoder(x)
        context = self.aspp(feats[-1])
        low = feats[self.low]
        y = self.decoder(torch.cat((upsample(context, low.shape[2:]), self.reduce(low)), 1))
        full = upsample(self.classifier(y), x.shape[2:])
        if self.deep_supervision and self.training:
            return [full, self.aux(context)]
        return full


@NETWORKS.register("deeplabv3plus")
def build_deeplabv3plus(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    return DeepLabV3Plus(ndim, cfg, in_channels, num_classes)
