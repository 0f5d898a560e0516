"""Losses: hand-computed values on tiny tensors, the ignore label, -1 as background, deep supervision,
batch vs per-sample Dice, bf16 autocast, 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoseg.losses import (
    LOSSES,
    build_loss,
    deep_supervision_weights,
    downsample_target,
)
from autoseg.schema.plans import Loss

NAMES = ["dice_ce", "dice", "jaccard", "ce", "focal", "focal_dice", "dice_topk"]
S = 1e-5  # smoothing


def two_class_logits(p1: list[float], shape: tuple[int, ...]) -> torch.Tensor:
    """Logits (1, 2, *shape) whose softmax gives foreground probabilities ``p1`` exactly."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).float().reshape(1, 2, *shape)


# Foreground probabilities and target of 4 voxels; p_t is the probability of the true class.
P1, TARGET = [0.9, 0.2, 0.6, 0.1], [1, 0, 1, 0]
P_T = [0.9, 0.8, 0.6, 0.9]
EXPECTED = {
    "dice": 1 - (2 * 1.5 + S) / (1.8 + 2 + S),  # intersection 1.5, prediction 1.8, truth 2
    "jaccard": 1 - (1.5 + S) / (1.8 + 2 - 1.5 + S),
    "ce": -sum(math.log(p) for p in P_T) / 4,
    "focal": -sum((1 - p) ** 2 * math.log(p) for p in P_T) / 4,
}
EXPECTED["dice_ce"] = EXPECTED["dice"] + EXPECTED["ce"]
EXPECTED["focal_dice"] = EXPECTED["focal"] + EXPECTED["dice"]
EXPECTED["dice_topk"] = EXPECTED["dice"] - math.log(min(P_T))  # TopK: the hardest 10 % of 4 voxels is the worst one


def loss_value(name: str, logits, target, **kw) -> float:
    return float(build_loss(Loss(name), logits.shape[1], **kw)(logits, target))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 2), (2, 2, 1), (1, 2, 2)], ids=["2d", "3d", "3d-z"])
def test_loss_matches_hand_computed_value_in_2d_and_3d(name, shape):
    logits = two_class_logits(P1, shape)
    target = torch.tensor(TARGET).reshape(1, *shape)
    assert loss_value(name, logits, target) == pytest.approx(EXPECTED[name], rel=1e-5)


@pytest.mark.parametrize("name", ["dice", "jaccard"])
def test_perfect_prediction_gives_zero_overlap_loss(name):
    target = torch.tensor([[[0, 1], [2, 1]]])
    logits = 50.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert loss_value(name, logits, target) == pytest.approx(0.0, abs=1e-6)
    assert loss_value(name, -logits, target) == pytest.approx(1.0, abs=1e-4)  # all wrong


def test_overlap_loss_excludes_background():
    # Foreground p = 1 on its one voxel, 0.5 on the three background voxels: foreground Dice 2 / 3.5.
    # With background (Dice 3 / 4.5) averaged in, the loss would be 0.38 instead of 0.43.
    target = torch.tensor([[[1, 0], [0, 0]]])
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[40.0, 0.0], [0.0, 0.0]]]])
    assert loss_value("dice", logits, target) == pytest.approx(1 - (2 + S) / (1 + 2.5 + S), rel=1e-5)


def test_topk_cross_entropy_is_the_mean_over_the_hardest_share_of_counted_voxels():
    from autoseg.losses import TopKCrossEntropyLoss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 10, 10), torch.randint(0, 3, (2, 10, 10))
    ce = F.cross_entropy(logits, target, reduction="none").reshape(-1)
    assert float(TopKCrossEntropyLoss(0.1)(logits, target, None)) == pytest.approx(float(ce.topk(20).values.mean()))
    valid = target != 2
    kept = F.cross_entropy(logits, target, reduction="none")[valid]
    n = int(kept.numel() * 0.25)
    assert float(TopKCrossEntropyLoss(0.25)(logits, target, valid)) == pytest.approx(float(kept.topk(n).values.mean()))


def test_cross_entropy_equals_torch():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 5, 6, 3), torch.randint(0, 4, (2, 5, 6, 3))
    assert loss_value("ce", logits, target) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)


def test_batch_dice_differs_from_per_sample_dice():
    # Sample 0 has foreground (Dice 0.8); sample 1 has none but predicts some (Dice ~0 on its own).
    logits = torch.cat([two_class_logits([0.8, 0.8, 0.2, 0.2], (2, 2)), two_class_logits([0.2] * 4, (2, 2))])
    target = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    per_sample = 1 - ((3.2 + S) / (4 + S) + S / (0.8 + S)) / 2
    batch = 1 - (3.2 + S) / (4.8 + S)
    assert float(build_loss(Loss("dice"), 2)(logits, target)) == pytest.approx(per_sample, rel=1e-5)
    assert float(build_loss(Loss("dice", batch_dice=True), 2)(logits, target)) == pytest.approx(batch, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_ignored_voxels_change_no_loss_and_get_no_gradient(name):
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    target[:, :2] = 3  # ignore label, above the classes
    loss_fn = build_loss(Loss(name), 3, ignore_label=3)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    changed = logits.detach().clone()
    changed[:, :, :2] = 10 * torch.randn_like(changed[:, :, :2])
    assert float(loss_fn(changed, target)) == pytest.approx(loss.item(), rel=1e-6)
    assert torch.all(logits.grad[:, :, :2] == 0) and logits.grad[:, :, 2:].abs().sum() > 0


def test_cross_entropy_with_ignore_label_equals_torch_ignore_index():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 3, 6, 6), torch.randint(0, 4, (2, 6, 6))
    expected = float(F.cross_entropy(logits, target.masked_fill(target == 3, -100)))
    assert loss_value("ce", logits, target, ignore_label=3) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_all_voxels_ignored_gives_finite_zero(name):
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = build_loss(Loss(name), 2, ignore_label=2)(logits, torch.full((1, 3, 3), 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_minus_one_is_background(name):
    torch.manual_seed(3)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    outside = target.clone()
    outside[:, 0][target[:, 0] == 0] = -1
    assert (outside == -1).any()
    assert loss_value(name, logits, outside) == pytest.approx(loss_value(name, logits, target), rel=1e-6)
    assert loss_value(name, logits, outside, ignore_label=3) == pytest.approx(loss_value(name, logits, target),
                                                                              rel=1e-6)


def test_target_with_channel_axis_and_small_int_dtype_is_accepted():
    torch.manual_seed(4)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    loss_fn = build_loss(Loss(), 3)
    assert float(loss_fn(logits, target[:, None].to(torch.int8))) == pytest.approx(float(loss_fn(logits, target)))


def test_deep_supervision_weights_halve_and_drop_the_coarsest():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([2 / 3, 1 / 3])
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    with pytest.raises(ValueError, match="halving"):
        deep_supervision_weights(3, "linear")


def test_downsample_target_is_nearest_neighbour():
    target = torch.randint(0, 4, (2, 8, 8, 6))
    assert downsample_target(target, (8, 8, 6)) is target
    half = downsample_target(target, (4, 4, 3))
    assert half.shape == (2, 4, 4, 3) and torch.equal(half, target[:, ::2, ::2, ::2])
    aniso = downsample_target(target, (8, 4, 3))  # in-plane only, as anisotropic plans pool
    assert aniso.shape == (2, 8, 4, 3) and torch.equal(aniso, target[:, :, ::2, ::2])
    interp = F.interpolate(target[:, None].float(), size=(4, 4, 3), mode="nearest")[:, 0].long()
    assert torch.equal(half, interp)  # the strided shortcut picks the same voxels
    odd = downsample_target(target, (3, 5, 4))  # non-integer ratio
    assert odd.shape == (2, 3, 5, 4) and odd.dtype == target.dtype and set(odd.unique().tolist()) <= {0, 1, 2, 3}


def test_deep_supervision_combines_scales_with_their_weights():
    torch.manual_seed(5)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 3
    outs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)]
    ds = build_loss(Loss(), 3, ignore_label=3, deep_supervision_scales=4)
    single = build_loss(Loss(), 3, ignore_label=3)
    w = deep_supervision_weights(4)
    expected = sum(wi * float(single(o, downsample_target(target, o.shape[2:]))) for wi, o in zip(w, outs))
    assert float(ds(outs, target)) == pytest.approx(expected, rel=1e-6)
    assert float(ds(outs[0], target)) == pytest.approx(float(single(outs[0], target)))  # eval mode: one tensor
    with pytest.raises(ValueError, match="4 deep-supervision scales"):
        ds(outs[:3], target)


def test_zero_weighted_coarsest_output_stays_in_the_graph():
    outs = [torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 4, 4, requires_grad=True),
            torch.randn(1, 2, 2, 2, requires_grad=True)]
    build_loss(Loss(), 2, deep_supervision_scales=3)(outs, torch.randint(0, 2, (1, 8, 8))).backward()
    assert outs[1].grad.abs().sum() > 0
    assert outs[2].grad is not None and torch.all(outs[2].grad == 0)


def test_works_with_a_deep_supervised_network():
    from autoseg.nets import build_network
    from autoseg.schema.plans import Network

    cfg = Network(features=[4, 8, 8], kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]])
    net = build_network(cfg, 1, 3, 3).train()
    outs = net(torch.randn(1, 1, 4, 8, 8))
    loss = build_loss(Loss(), 3, deep_supervision_scales=len(outs))(outs, torch.randint(-1, 3, (1, 4, 8, 8)))
    loss.backward()
    assert len(outs) == 2 and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_on_cpu_gives_float32_loss_and_finite_gradients(name):
    torch.manual_seed(6)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    x, target = torch.randn(2, 1, 6, 6, 6), torch.randint(0, 4, (2, 6, 6, 6))
    loss_fn = build_loss(Loss(name), 3, ignore_label=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        loss = loss_fn(logits, target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert loss.item() == pytest.approx(loss_fn(conv(x), target).item(), rel=0.05)


def test_registry_knows_every_plan_loss_and_accepts_new_ones():
    assert set(NAMES) <= set(LOSSES)
    with pytest.raises(ValueError, match="unknown loss 'tversky'"):
        build_loss(Loss("tversky"), 2)
    with pytest.raises(ValueError, match=">= 2"):
        build_loss(Loss(), 1)

    @LOSSES.register("_mean_logit")
    def _mean_logit(cfg: Loss) -> torch.nn.Module:
        class MeanLogit(torch.nn.Module):
            def forward(self, logits, target, valid):
                return logits.mean()
        return MeanLogit()

    try:
        assert float(build_loss(Loss("_mean_logit"), 2)(torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2))) == 1.0
    finally:
        del LOSSES["_mean_logit"]


# --- regions: one sigmoid per region, Dice + BCE ----------------------------------------------------------

BRATS = [(1, 2, 3), (2, 3), (3,)]  # whole tumour, tumour core, enhancing tumour


def region_loss(**kw):
    return build_loss(Loss("dice_bce"), len(BRATS), regions=BRATS, **kw)


def test_region_loss_matches_hand_computed_bce_plus_dice_per_region():
    """Labels [0, 1, 2, 3] make the overlapping targets whole [0,1,1,1], core [0,0,1,1], enhancing [0,0,0,1]."""
    target = torch.tensor([[0, 1, 2, 3]])
    p = torch.tensor([[0.2, 0.7, 0.9, 0.6], [0.1, 0.4, 0.8, 0.7], [0.3, 0.2, 0.4, 0.9]], dtype=torch.float64)
    logits = torch.log(p / (1 - p)).float()[None]  # (1, 3 regions, 4 voxels)
    truth = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float64)
    bce = float(-(truth * p.log() + (1 - truth) * (1 - p).log()).mean())
    dice = [(2 * float((p[r] * truth[r]).sum()) + S) / (float(p[r].sum() + truth[r].sum()) + S) for r in range(3)]
    expected = bce + 1 - sum(dice) / 3
    assert float(region_loss()(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_region_loss_is_zero_only_for_a_perfect_overlapping_prediction():
    target = torch.tensor([[[0, 1], [2, 3]]])
    masks = torch.stack([sum(target == v for v in r).bool() for r in BRATS], 1).float()
    assert float(region_loss()(40.0 * (2 * masks - 1), target)) == pytest.approx(0.0, abs=1e-5)
    exclusive = masks.clone()
    exclusive[:, 0][target > 1] = 0  # a softmax-like answer: each voxel in one region only
    assert float(region_loss()(40.0 * (2 * exclusive - 1), target)) > 0.1


def test_region_loss_ignores_the_ignore_label_and_reads_minus_one_as_background():
    torch.manual_seed(7)
    target = torch.randint(0, 4, (2, 4, 4, 4))
    target[:, :2] = 4  # ignore label, above the values
    loss_fn = region_loss(ignore_label=4)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    changed = logits.detach().clone()
    changed[:, :, :2] = 10 * torch.randn_like(changed[:, :, :2])
    assert float(loss_fn(changed, target)) == pytest.approx(loss.item(), rel=1e-6)
    assert torch.all(logits.grad[:, :, :2] == 0) and logits.grad[:, :, 2:].abs().sum() > 0
    outside = target.clone()
    outside[target == 0] = -1
    assert loss_fn(logits, outside).item() == pytest.approx(loss.item(), rel=1e-6)


def test_region_loss_downsamples_the_labels_for_deep_supervision():
    """Nearest-neighbour labels then regions == regions of the nearest-neighbour labels: each output is scored
    against its own resolution's region masks, with the halving weights."""
    torch.manual_seed(8)
    target = torch.randint(0, 4, (2, 8, 8))
    outs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    ds = build_loss(Loss("dice_bce"), 3, deep_supervision_scales=3, regions=BRATS)
    single = region_loss()
    expected = sum(w * float(single(o, downsample_target(target, o.shape[2:])))
                   for w, o in zip(deep_supervision_weights(3), outs))
    assert float(ds(outs, target)) == pytest.approx(expected, rel=1e-6)


def test_region_and_label_losses_refuse_each_others_outputs():
    with pytest.raises(ValueError, match="one region per output"):
        build_loss(Loss("dice_bce"), 4, regions=BRATS)
    with pytest.raises(ValueError, match="one region per output"):
        build_loss(Loss("dice_bce"), 3)
    with pytest.raises(ValueError, match="regions train with a region loss"):
        build_loss(Loss("dice_ce"), 3, regions=BRATS)


def test_region_loss_under_bf16_autocast_is_float32_and_finite():
    conv = torch.nn.Conv3d(4, 3, 3, padding=1)
    x, target = torch.randn(2, 4, 6, 6, 6), torch.randint(0, 4, (2, 6, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = region_loss()(conv(x), target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
