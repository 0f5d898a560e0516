"""U-Nets: plain convolutional encoder (nnU-Net's default) and residual encoder (nnU-Net ResEnc)."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.nets.blocks import ConvNormAct, ResidualBlock, conv_cls, transp_conv_cls
from autoseg.nets.registry import NETWORKS
from autoseg.schema.plans import Network


class Decoder(nn.Module):
    """Transposed-conv upsampling, skip concatenation, convs, and a 1x1 head per stage (deep supervision)."""

    def __init__(self, ndim: int, cfg: Network, num_classes: int):
        super().__init__()
        f, k, s = cfg.features, cfg.kernel_sizes, cfg.strides
        self.ups, self.stages, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(len(f) - 1, 0, -1):  # from the bottleneck up
            self.ups.append(transp_conv_cls(ndim)(f[i], f[i - 1], s[i], s[i], bias=True))
            convs = [ConvNormAct(ndim, 2 * f[i - 1] if j == 0 else f[i - 1], f[i - 1], k[i - 1], 1, cfg.norm, cfg.nonlin)
                     for j in range(cfg.decoder_convs)]
            self.stages.append(nn.Sequential(*convs))
            self.heads.append(conv_cls(ndim)(f[i - 1], num_classes, 1, 1, 0, bias=True))
        self.deep_supervision = cfg.deep_supervision

    def forward(self, skips: list):
        x = skips[-1]
        outputs = []
        for i, (up, stage, head) in enumerate(zip(self.ups, self.stages, self.heads)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), 1))
            if (self.deep_supervision and self.training) or i == len(self.stages) - 1:
                outputs.append(head(x))
        outputs.reverse()
        return outputs if self.deep_supervision and self.training else outputs[0]


class PlainEncoder(nn.Module):
    def __init__(self, ndim: int, cfg: Network, in_channels: int):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = in_channels
        for i, (f, k, s) in enumerate(zip(cfg.features, cfg.kernel_sizes, cfg.strides)):
            n = cfg.blocks_per_stage[i] if cfg.blocks_per_stage else 2
            convs = [ConvNormAct(ndim, cin if j == 0 else f, f, k, s if j == 0 else 1, cfg.norm, cfg.nonlin)
                     for j in range(n)]
            self.stages.append(nn.Sequential(*convs))
            cin = f

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class ResidualEncoder(nn.Module):
    def __init__(self, ndim: int, cfg: Network, in_channels: int):
        super().__init__()
        self.stem = ConvNormAct(ndim, in_channels, cfg.features[0], cfg.kernel_sizes[0], 1, cfg.norm, cfg.nonlin)
        self.stages = nn.ModuleList()
        cin = cfg.features[0]
        for i, (f, k, s) in enumerate(zip(cfg.features, cfg.kernel_sizes, cfg.strides)):
            n = cfg.blocks_per_stage[i] if cfg.blocks_per_stage else 1 + min(i, 3)
            blocks = [ResidualBlock(ndim, cin if j == 0 else f, f, k, s if j == 0 else 1, cfg.norm, cfg.nonlin)
                      for j in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            cin = f

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNet(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x):
        return self.decoder(self.encoder(x))


@NETWORKS.register("unet")
def build_unet(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    return UNet(PlainEncoder(ndim, cfg, in_channels), Decoder(ndim, cfg, num_classes))


@NETWORKS.register("resenc_unet")
def build_resenc_unet(cfg: Network, in_channels: int, num_classes: int, ndim: int) -> nn.Module:
    return UNet(ResidualEncoder(ndim, cfg, in_channels), Decoder(ndim, cfg, num_classes))
