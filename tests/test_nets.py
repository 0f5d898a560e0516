"""Networks: every family builds from the same plan entry, on 2D, 3D and anisotropic plans, in every mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoseg.nets import NETWORKS, build_network, count_parameters, describe, training_outputs
from autoseg.nets.blocks import norm_layer
from autoseg.nets.deeplab import ASPP, atrous
from autoseg.plan.compute import count_step_flops
from autoseg.schema.plans import Network

FAMILIES = ["unet", "resenc_unet", "fcn", "deeplabv3plus"]
IN_CH, CLASSES = 2, 3

# name -> (patch, kernel sizes, strides); the patch is divisible by the total stride, as the planner makes it
PLANS = {
    "2d": ((32, 32), [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]]),
    "3d": ((16, 16, 16), [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    "aniso": ((16, 32, 32), [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]),
    "deep2d": ((64, 64), [[3, 3]] * 6, [[1, 1]] + [[2, 2]] * 5),  # total stride 32: DeepLab dilates
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def network(family: str, plan: str, deep_supervision: bool = True, **kw) -> Network:
    _, kernels, strides = PLANS[plan]
    n = len(strides)
    return Network(family=family, features=[4 * 2 ** i for i in range(n)][:n], kernel_sizes=kernels,
                   strides=strides, blocks_per_stage=[1] * n, decoder_convs=1,
                   deep_supervision=deep_supervision, **kw)


def stage_shapes(patch: tuple[int, ...], strides: list[list[int]]) -> list[tuple[int, ...]]:
    shapes, cur = [], list(patch)
    for s in strides:
        cur = [c // a for c, a in zip(cur, s)]
        shapes.append(tuple(cur))
    return shapes


def run(net: nn.Module, patch: tuple[int, ...]) -> torch.Tensor | list[torch.Tensor]:
    torch.manual_seed(0)
    return net(torch.randn(2, IN_CH, *patch))


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_deep_supervision_gives_full_resolution_first_then_coarser_stage_resolutions(family, plan):
    patch, _, strides = PLANS[plan]
    net = build_network(network(family, plan), IN_CH, CLASSES, len(patch)).train()
    outs = run(net, patch)
    assert isinstance(outs, list) and len(outs) >= 1
    assert outs[0].shape == (2, CLASSES, *patch)
    valid = stage_shapes(patch, strides)
    sizes = [tuple(o.shape[2:]) for o in outs]
    for o in outs:
        assert o.shape[:2] == (2, CLASSES) and tuple(o.shape[2:]) in valid  # a loss can resize targets to it
    assert all(math.prod(a) > math.prod(b) for a, b in zip(sizes, sizes[1:]))  # strictly coarser
    if family in ("unet", "resenc_unet"):
        assert len(outs) == len(strides) - 1
    assert training_outputs(network(family, plan), IN_CH, CLASSES, len(patch)) == len(outs)  # for the loss
    assert training_outputs(network(family, plan, deep_supervision=False), IN_CH, CLASSES, len(patch)) == 1
    # every parameter takes part when all heads are supervised (DDP needs no unused-parameter search)
    sum(o.float().mean() for o in outs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_one_full_resolution_tensor_without_deep_supervision_and_in_eval(family, plan):
    patch, _, _ = PLANS[plan]
    net = build_network(network(family, plan, deep_supervision=False), IN_CH, CLASSES, len(patch)).train()
    out = run(net, patch)
    assert isinstance(out, torch.Tensor) and out.shape == (2, CLASSES, *patch)
    out.float().square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())

    net = build_network(network(family, plan, deep_supervision=True), IN_CH, CLASSES, len(patch)).eval()
    with torch.no_grad():
        out = run(net, patch)
        assert isinstance(out, torch.Tensor) and out.shape == (2, CLASSES, *patch)
        bigger = tuple(2 * p for p in patch)  # any multiple of the total stride: sliding windows may differ
        assert run(net, bigger).shape == (2, CLASSES, *bigger)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_and_nonlinearity_names_are_honoured(family):
    cfg = network(family, "aniso", norm="group", nonlin="gelu")
    kinds = {type(m) for m in build_network(cfg, IN_CH, CLASSES, 3).modules()}
    assert nn.GroupNorm in kinds and nn.GELU in kinds
    assert not any(issubclass(k, (nn.InstanceNorm3d, nn.BatchNorm3d, nn.LeakyReLU, nn.ReLU)) for k in kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_one_axes_stay_kernel_one(family):
    net = build_network(network(family, "aniso"), IN_CH, CLASSES, 3)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv3d) and m.in_channels == IN_CH)
    assert first.kernel_size == (1, 3, 3) and first.padding == (0, 1, 1)


def test_deeplab_replaces_strides_past_sixteen_with_dilation():
    net = build_network(network("deeplabv3plus", "deep2d"), IN_CH, CLASSES, 2)
    assert max(max(s) for s in net.encoder.stage_strides) == 16
    assert net.encoder.dilation == [2, 2]
    last = [m for m in net.encoder.stages[-1].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert last and all(m.dilation == (2, 2) and m.padding == (2, 2) for m in last)
    rates = [m.dilation for m in net.aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert rates == [(2, 2), (4, 4), (6, 6)]  # (1, 2, 3) times the encoder's dilation
    assert max(net.encoder.stage_strides[net.low]) <= 4  # low-level features from total stride 4


def test_dilation_only_on_axes_with_a_kernel_larger_than_one():
    conv = atrous(nn.Conv3d(1, 1, (1, 3, 3)), [4, 2, 2])
    assert conv.dilation == (1, 2, 2) and conv.padding == (0, 2, 2)
    aspp = ASPP(3, 8, 4, [1, 3, 3], [1, 1, 1], "instance", "leaky_relu")
    for m in aspp.modules():
        if isinstance(m, nn.Conv3d):
            assert m.dilation[0] == 1 and m.padding[0] == 0
    x = torch.randn(2, 8, 3, 6, 6)
    assert aspp(x).shape == (2, 4, 3, 6, 6)


def test_unet_parameter_count_matches_hand_calculation():
    # 2D, in 1, classes 2, features [2, 4], 3x3 kernels, one conv per stage, instance norm (weight + bias)
    cfg = Network(family="unet", features=[2, 4], kernel_sizes=[[3, 3], [3, 3]], strides=[[1, 1], [2, 2]],
                  blocks_per_stage=[1, 1], decoder_convs=1)
    enc0 = (1 * 2 * 9 + 2) + 2 * 2  # conv 1->2, norm
    enc1 = (2 * 4 * 9 + 4) + 2 * 4  # strided conv 2->4, norm
    up = 4 * 2 * 2 * 2 + 2  # transposed conv 4->2, kernel = stride = 2x2
    dec = (4 * 2 * 9 + 2) + 2 * 2  # conv on [up, skip] 4->2, norm
    heads = 2 * 2 + 2  # a 1x1 head per decoder stage (one here), 2->2
    expected = enc0 + enc1 + up + dec + heads
    assert expected == 226
    assert count_parameters(build_network(cfg, 1, 2, 2)) == expected
    assert describe(cfg, 1, 2, 2, [16, 16])["parameters"] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_counts_parameters_and_flops_without_computing(family):
    patch, _, strides = PLANS["aniso"]
    cfg = network(family, "aniso")
    d = describe(cfg, IN_CH, CLASSES, 3, list(patch), batch=2)
    assert d["parameters"] == count_parameters(build_network(cfg, IN_CH, CLASSES, 3)) > 0
    assert 0 < d["forward_flops"] < d["train_step_flops"]
    assert d["train_output_shapes"][0] == [2, CLASSES, *patch]
    # the planner's count (reference patch, scaled by voxels) agrees: convolutions are linear in voxels
    planned = count_step_flops(cfg, IN_CH, CLASSES, 3, list(patch), 2)
    assert planned == pytest.approx(d["train_step_flops"], rel=0.01)
    with pytest.raises(ValueError, match="axes"):
        describe(cfg, IN_CH, CLASSES, 3, [16, 32])


def test_unknown_family_is_a_value_error_naming_the_known_ones():
    assert set(FAMILIES) <= set(NETWORKS)
    with pytest.raises(ValueError, match="unknown network family 'segformer'.*deeplabv3plus"):
        build_network(Network(family="segformer", features=[4], kernel_sizes=[[3, 3]], strides=[[1, 1]]), 1, 2, 2)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_instance_norm_keeps_channels_last_and_equals_torchs(ndim, batch):
    """Channels-last in, channels-last out (no copy to NCDHW and back around every norm); the values and
    gradients of torch's instance norm on the same tensor in NCDHW; the same state dict."""
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    torch.manual_seed(0)
    ours = norm_layer("instance", ndim, 4)
    ref = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[ndim](4, affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 4, *[5, 6, 7][:ndim]) * 3 + 1
    g = torch.randn_like(x)
    xa, xb = x.contiguous(memory_format=fmt).requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert ya.is_contiguous(memory_format=fmt) and torch.allclose(ya, yb, atol=1e-5)
    ya.backward(g.contiguous(memory_format=fmt)), yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-4)
    assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-4)
    assert torch.equal(ours(x), ref(x))  # NCDHW takes torch's own path


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_region_outputs_with_the_region_loss(family):
    """A region model is any family with one output per region (one region too): the loss reads the outputs
    as sigmoids and the gradient reaches every parameter that makes the full-resolution output."""
    from autoseg.losses import build_loss
    from autoseg.schema.plans import Loss

    patch = PLANS["3d"][0]
    for regions in ([(1, 2, 3), (2, 3), (3,)], [(1, 2)]):
        net = build_network(network(family, "3d"), IN_CH, len(regions), 3).train()
        outs = run(net, patch)
        n = len(outs) if isinstance(outs, list) else 1
        loss = build_loss(Loss("dice_bce"), len(regions), None, n, regions)(outs, torch.randint(0, 4, (2, *patch)))
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
