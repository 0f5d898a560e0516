"""The planner's rules (autoseg/plan/rules.py) and budget (autoseg/plan/budget.py) on made-up fingerprints.

Every fingerprint here is built in memory by :func:`make_fingerprint`, so each test states exactly the
dataset property it is about (spacing, shape, channel names, label statistics) and nothing is read from disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from autoseg.errors import UserError
from autoseg.fingerprint import modality_of
from autoseg.plan import budget, rules
from autoseg.schema.fingerprint import CaseFingerprint, ChannelStats, ClassStats, Fingerprint
from autoseg.schema.plans import Optimizer

ANISO_Z = [5.0, 4.0, 5.0, 6.0, 5.0]  # the coarse axis of the anisotropic dataset; 10th percentile 4.4


def make_class(value: int, present: int, volume: float, extent_mm: Sequence[float]) -> ClassStats:
    """Label statistics of one class: in ``present`` cases, ``volume`` voxels (median), p95 extent in mm."""
    spread = {"median": float(volume), "p5": volume / 2, "p95": volume * 2}
    return ClassStats(value=value, name=f"class{value}", cases_present=present, volume_voxels=spread,
                      volume_mm3=dict(spread), components_per_case={"median": 1.0, "max": 1.0},
                      extent_mm={"median": list(extent_mm), "p95": list(extent_mm)})


def make_fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *,
                     channels: Sequence[str] = ("MRI",), cropped: Sequence[Sequence[int]] | None = None,
                     classes: Sequence[ClassStats] | None = None, file_ending: str = ".nii.gz",
                     intensity: tuple[float, float] = (-1000.0, 2000.0)) -> Fingerprint:
    """A Fingerprint with one case per (spacing, shape); by default one class spanning ~10 voxels per axis."""
    cropped = cropped or shapes
    cases = [CaseFingerprint(id=f"case{i:03d}", spacing=[float(s) for s in sp], shape=list(sh),
                             cropped_shape=list(cr), crop_box=[[0, n] for n in cr], source_hash=f"h{i}")
             for i, (sp, sh, cr) in enumerate(zip(spacings, shapes, cropped))]
    lo, hi = intensity
    stats = [ChannelStats(name=c, modality=modality_of(c), mean=100.0 + i, std=20.0 + i, median=90.0, min=lo,
                          max=hi, percentile_00_5=lo / 10 - i, percentile_99_5=hi / 10 + i)
             for i, c in enumerate(channels)]
    median_spacing = [float(v) for v in np.median(np.asarray(spacings, float), 0)]
    if classes is None:
        classes = [make_class(1, len(cases), 1000.0, [10 * s for s in median_spacing])]
    return Fingerprint(
        dataset_name="Dataset999_Made", dataset_hash="0123abcd", ndim=len(shapes[0]), channel_names=list(channels),
        labels={"background": 0, **{c.name: c.value for c in classes}}, file_ending=file_ending, cases=cases,
        channels=stats, classes=list(classes), median_spacing=median_spacing,
        median_shape=[int(v) for v in np.median(np.asarray(shapes), 0)],
        median_cropped_shape=[int(v) for v in np.median(np.asarray(cropped), 0)],
        anisotropy_ratio=max(median_spacing) / min(median_spacing))


def isotropic(shape: Sequence[int] = (128, 128, 128), **kw) -> Fingerprint:
    return make_fingerprint([(1.0,) * len(shape)] * 5, [tuple(shape)] * 5, **kw)


def anisotropic(coarse_axis: int = 0, depth: int = 30, **kw) -> Fingerprint:
    """Thick slices (4-6 mm, 10th percentile 4.4 mm) on ``coarse_axis``, 0.8 mm in plane, few slices."""
    spacings, shapes = [], []
    for z in ANISO_Z:
        sp, sh = [0.8, 0.8, 0.8], [256, 256, 256]
        sp[coarse_axis], sh[coarse_axis] = z, depth
        spacings.append(sp)
        shapes.append(sh)
    return make_fingerprint(spacings, shapes, **kw)


def planar(shape: Sequence[int] = (256, 256), **kw) -> Fingerprint:
    return make_fingerprint([(1.0, 1.0)] * 5, [tuple(shape)] * 5, **kw)


# --- spacing and axis order -------------------------------------------------------------------------


def test_isotropic_target_spacing_is_the_median_and_axes_stay_in_order():
    fp = make_fingerprint([(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (0.8, 0.8, 0.8)], [(64, 64, 64)] * 3)
    assert rules.target_spacing(fp) == [1.0, 1.0, 1.0]
    assert rules.axis_order(rules.target_spacing(fp)) == [0, 1, 2]


def test_anisotropic_coarse_axis_takes_the_10th_percentile_spacing():
    spacing = rules.target_spacing(anisotropic())
    assert spacing[0] == pytest.approx(np.percentile(ANISO_Z, 10)) and spacing[0] < np.median(ANISO_Z)
    assert spacing[1:] == [0.8, 0.8]


def test_anisotropic_spacing_alone_keeps_the_median_when_the_coarse_axis_has_many_voxels():
    """nnU-Net's rule needs both: > 3x coarser spacing and < 1/3 of the voxels of the other axes."""
    assert rules.target_spacing(anisotropic(depth=200))[0] == pytest.approx(np.median(ANISO_Z))


@pytest.mark.parametrize("coarse", [0, 1, 2])
def test_axis_order_puts_the_coarse_axis_first(coarse: int):
    fp = anisotropic(coarse_axis=coarse)
    order = rules.axis_order(rules.target_spacing(fp))
    assert order[0] == coarse and sorted(order) == [0, 1, 2]
    spacing = rules.permute(rules.target_spacing(fp), order)
    assert spacing[0] == pytest.approx(4.4) and spacing[1:] == [0.8, 0.8]
    assert rules.median_resampled_shape(fp, spacing, order)[1:] == [256, 256]


def test_2d_spacing_is_the_median_and_has_no_axis_to_move():
    fp = make_fingerprint([(0.5, 0.5), (0.7, 0.7), (0.6, 0.6)], [(128, 96)] * 3)
    assert rules.target_spacing(fp) == [0.6, 0.6]
    assert rules.axis_order([0.6, 0.6]) == [0, 1]


# --- topology and patch -------------------------------------------------------------------------------


def bottleneck(topo: rules.Topology) -> list[float]:
    return [p / d for p, d in zip(topo.patch_size, topo.divisor)]


def test_isotropic_topology_pools_every_axis_with_3_kernels_down_to_at_least_4_voxels():
    topo = rules.topology([1.0, 1.0, 1.0], [128, 128, 128])
    assert all(k == [3, 3, 3] for k in topo.kernel_sizes)
    assert topo.strides[0] == [1, 1, 1] and all(s == [2, 2, 2] for s in topo.strides[1:])
    assert all(b >= 4 for b in bottleneck(topo)) and topo.divisor == [32, 32, 32]
    assert len(topo.kernel_sizes) == len(topo.strides) == topo.n_stages


def test_anisotropic_topology_uses_kernel_1_on_the_coarse_axis_until_it_is_within_2x():
    topo = rules.topology([4.4, 0.8, 0.8], [24, 192, 192])
    assert topo.kernel_sizes[0] == [1, 3, 3] and topo.kernel_sizes[1] == [1, 3, 3]
    assert topo.strides[1] == [1, 2, 2] and topo.strides[2] == [1, 2, 2]  # in-plane pooled first
    first_z = next(i for i, k in enumerate(topo.kernel_sizes) if k[0] == 3)
    in_plane_spacing = 0.8 * 2 ** sum(s[1] == 2 for s in topo.strides[: first_z + 1])
    assert 4.4 / in_plane_spacing < 2  # 3-kernels on z only once in-plane pooling brought it within 2x
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisor))


def test_a_thin_slab_pools_its_long_axes_on_after_the_short_one_stops():
    """An axis too short to pool further must not stop the others through the spacing rule (it is not coarser
    for being short): a 20x160x160 slab at 1 mm pools in-plane down to 5 voxels, as nnU-Net's rule does."""
    topo = rules.topology([1.0, 1.0, 1.0], [20, 160, 160])
    assert bottleneck(topo) == [5, 5, 5] and topo.divisor == [4, 32, 32]
    assert topo.strides[-3:] == [[1, 2, 2]] * 3


def test_tiny_patch_keeps_a_bottleneck_of_at_least_4_voxels():
    for patch in ([10, 12, 9], [8, 8, 8], [5, 6, 7], [12, 10]):
        topo = rules.topology([1.0] * len(patch), patch)
        assert all(b >= 4 or d == 1 for b, d in zip(bottleneck(topo), topo.divisor)), (patch, topo)
        assert all(p - o < d for p, o, d in zip(topo.patch_size, patch, topo.divisor))  # rounded up one step at most


def test_initial_patch_is_a_mm_cube_clipped_to_the_image():
    patch = rules.initial_patch([4.0, 1.0, 1.0], [200, 400, 400], 64 ** 3)
    assert patch[1] == patch[2] and patch[0] * 4 == pytest.approx(patch[1], rel=0.05)
    assert rules.initial_patch([1.0, 1.0, 1.0], [10, 12, 9], 160 ** 3) == [10, 12, 9]


def test_object_patch_holds_the_p95_extent_with_context_but_not_more_than_the_image():
    fp = isotropic(classes=[make_class(1, 5, 500.0, [40.0, 20.0, 10.0])])
    patch = rules.object_patch(fp, [1.0, 1.0, 1.0], [0, 1, 2], [128, 128, 128])
    assert all(p >= e * 1.25 for p, e in zip(patch, [40, 20, 10]))
    assert rules.object_patch(fp, [1.0, 1.0, 1.0], [0, 1, 2], [30, 16, 12]) == [30, 16, 12]


def test_shrink_patch_shrinks_the_axis_largest_relative_to_the_image_and_respects_the_floor():
    assert rules.shrink_patch([64, 64, 64], [64, 256, 256], [8, 8, 8], [1, 1, 1]) == [56, 64, 64]
    assert rules.shrink_patch([64, 64, 64], [64, 256, 256], [8, 8, 8], [60, 1, 1]) == [64, 56, 64]
    assert rules.shrink_patch([8, 8, 8], [64, 64, 64], [8, 8, 8], [1, 1, 1]) is None


def test_lowres_spacing_only_when_the_patch_covers_little_of_a_large_image():
    assert rules.lowres_spacing([1.0, 1.0, 1.0], [128, 128, 128], 128 ** 3 // 2) is None
    low = rules.lowres_spacing([1.0, 0.8, 0.8], [400, 512, 512], 128 ** 3)
    assert low is not None and all(a > b for a, b in zip(low, [1.0, 0.8, 0.8]))
    shape = [n * s / t for n, s, t in zip([400, 512, 512], [1.0, 0.8, 0.8], low)]
    assert math.prod(shape) <= 4 * 128 ** 3 * 1.1  # about four patches at the coarser spacing


# --- normalization, resampling, sampling, augmentation ---------------------------------------------------


def test_ct_channel_is_clipped_to_the_fingerprints_percentiles_then_global_zscore():
    fp = isotropic(channels=("CT",))
    (n,) = rules.normalization(fp)
    ch = fp.channels[0]
    assert n.scheme == "ct" and not n.use_mask
    assert (n.clip_low, n.clip_high, n.mean, n.std) == (ch.percentile_00_5, ch.percentile_99_5, ch.mean, ch.std)


@pytest.mark.parametrize("name", ["MRI", "T2", "FLAIR", "adc"])
def test_non_ct_channels_get_a_per_image_zscore(name: str):
    (n,) = rules.normalization(isotropic(channels=(name,)))
    assert n.scheme == "zscore" and not n.use_mask and n.clip_low is None


def test_zscore_uses_the_nonzero_mask_when_cropping_removed_more_than_a_quarter():
    shapes = [(64, 64, 64)] * 5
    kept_half = make_fingerprint([(1.0, 1.0, 1.0)] * 5, shapes, cropped=[(32, 64, 64)] * 5)
    kept_most = make_fingerprint([(1.0, 1.0, 1.0)] * 5, shapes, cropped=[(56, 64, 64)] * 5)
    assert rules.normalization(kept_half)[0].use_mask
    assert not rules.normalization(kept_most)[0].use_mask


def test_multichannel_gets_one_scheme_per_channel_in_order():
    fp = isotropic(channels=("CT", "T1", "T2"))
    assert [n.scheme for n in rules.normalization(fp)] == ["ct", "zscore", "zscore"]


def test_8bit_natural_images_are_rescaled():
    fp = planar(channels=("microscopy",), file_ending=".png", intensity=(0.0, 255.0))
    assert rules.normalization(fp)[0].scheme == "rescale"


def test_resampling_is_separate_along_the_coarse_axis_only_when_anisotropic():
    aniso = rules.resampling([4.4, 0.8, 0.8])
    assert aniso.separate_z and aniso.z_axis == 0 and aniso.image_order == 3 and aniso.label_order == 1
    assert not rules.resampling([1.0, 1.0, 1.2]).separate_z
    assert not rules.resampling([0.8, 0.8]).separate_z


def test_sampling_favours_rare_and_tiny_classes():
    fp = isotropic(classes=[make_class(1, 5, 50_000.0, [60, 60, 60]), make_class(2, 1, 50_000.0, [60, 60, 60]),
                            make_class(3, 5, 100.0, [6, 6, 6])])
    s = rules.sampling(fp)
    assert s.class_weights["2"] > s.class_weights["1"] and s.class_weights["3"] > s.class_weights["1"]
    assert sum(s.class_weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert s.foreground_fraction > 0.33


def test_sampling_of_common_equal_classes_is_uniform():
    fp = isotropic(classes=[make_class(1, 5, 1000.0, [10] * 3), make_class(2, 5, 1000.0, [10] * 3)])
    s = rules.sampling(fp)
    assert s.class_weights == {"1": 0.5, "2": 0.5} and s.foreground_fraction == pytest.approx(0.33)


def test_a_class_under_a_percent_of_the_patch_trains_with_adamw_and_the_plan_says_which():
    fp = isotropic(classes=[make_class(1, 5, 50_000.0, [60] * 3), make_class(2, 3, 200.0, [7] * 3)])
    opt, why = rules.optimizer(fp, [48, 48, 48], [1.0, 1.0, 1.0])  # class 2: 200 mm3 of 110592 mm3, 0.18 %
    assert opt.name == "adamw" and opt.lr == rules.ADAMW_LR and "class2 (0.18% of a patch)" in why
    assert "class1" not in why
    assert rules.optimizer(fp, [4, 4, 4], [1.0, 1.0, 1.0]) == (Optimizer(), None)  # 200 of 64 mm3: not small
    absent = isotropic(classes=[make_class(1, 5, 50_000.0, [60] * 3), make_class(2, 0, 0.0, [0] * 3)])
    assert rules.optimizer(absent, [48, 48, 48], [1.0, 1.0, 1.0]) == (Optimizer(), None)  # no case has it


def test_a_2d_patch_counts_as_a_slab_one_slice_thick():
    fp = isotropic(classes=[make_class(1, 5, 100.0, [8] * 3)])
    assert rules.small_classes(fp, [64, 64], [1.0, 1.0], slice_mm=1.0) == {}  # 100 of 4096 mm3: 2.4 %
    assert rules.small_classes(fp, [64, 64], [1.0, 1.0], slice_mm=5.0) == {"class1": pytest.approx(100 / 20480)}


def test_augmentation_is_slicewise_for_flat_patches_and_rotates_fully_in_2d():
    assert rules.augmentation(3, [8, 128, 128], [4.4, 0.8, 0.8]).dummy_2d
    assert not rules.augmentation(3, [64, 64, 64], [1, 1, 1]).dummy_2d
    a2 = rules.augmentation(2, [128, 128], [1, 1])
    assert a2.rotation_deg == 180 and a2.mirror_axes == [0, 1]


# --- budget -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("1h30m", 5400),
                                           ("2d", 172800), ("45", 45), (" 20 M ", 1200), (600, 600)])
def test_parse_duration(text: str, seconds: float):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "20x", "m20", "1h-5m", "0", "0m", "-5", "nan", "inf"])
def test_parse_duration_refuses_nonsense_and_non_positive(text: str):
    with pytest.raises(UserError, match="budget"):
        budget.parse_duration(text)


def test_format_duration_reads_back():
    assert [budget.format_duration(s) for s in (59, 600, 630, 8 * 3600)] == ["59s", "10m", "10m30s", "8h00m"]


def test_small_budget_buys_one_run_of_the_primary_configuration():
    runs = budget.allocate_runs("3d_fullres", ["2d"], 5, 20 * 60)
    assert [(r["configuration"], r["fold"]) for r in runs] == [("3d_fullres", 0)]
    assert 0.5 * 1200 <= runs[0]["seconds"] < 1200  # the rest is kept for validation and bundling


def test_big_budget_trains_every_fold_of_every_configuration_within_the_budget():
    runs = budget.allocate_runs("3d_fullres", ["2d"], 5, 8 * 3600)
    assert {(r["configuration"], r["fold"]) for r in runs} == {(c, f) for c in ("3d_fullres", "2d") for f in range(5)}
    assert sum(r["seconds"] for r in runs) < 8 * 3600
    assert min(r["seconds"] for r in runs) >= budget.FOLDS_MIN_RUN_S


def test_target_steps_grow_monotonically_with_the_run_and_stay_bounded():
    seconds = [1, 60, 300, 600, 1800, 3600, 8 * 3600, 7 * 86400, 1e9]
    steps = [budget.target_steps(s) for s in seconds]
    assert steps == sorted(steps) and steps[0] == budget.MIN_STEPS and steps[-1] <= 20000
    assert steps[6] > steps[5] > steps[4]  # strictly more for long runs
