"""The augmentation pipeline: batchgenerators transforms, configured by ``Configuration.augmentation``.

The pipeline is nnU-Net's (v2, batchgenerators flavour): rotation and scaling (elastic deformation when
asked), Gaussian noise, blur, multiplicative brightness, contrast, low-resolution simulation, gamma (also
on the inverted image), mirroring; then the image is zeroed outside the nonzero mask for masked channels
and label -1 ("outside the mask", "padding") becomes background 0. We wrap the transforms, never fork them.

Every intensity field of :class:`~autoseg.schema.plans.Augmentation` is a probability per sample, so 0
disables that transform and :func:`scaled` makes a single "strength" knob for a search. Rotation and
scaling are each applied to :data:`SPATIAL_P` of the samples (nnU-Net's 0.2); the spatial transform reads
from a region larger than the patch (:func:`region_size`) and crops the centre, so rotated or zoomed-out
patches have no empty corners. Labels go through the same coordinate map with nearest interpolation:
they stay aligned with the image and keep their exact values (the ignore label included).

All randomness comes from the global states of ``np.random`` and ``random`` (batchgenerators draws from
both): the loader seeds them per batch, which makes batches reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from autoseg.schema.plans import Augmentation

SPATIAL_P = 0.2  # share of samples rotated, and (independently) scaled; nnU-Net's value
ELASTIC_P = 0.2  # share of samples deformed when ``Augmentation.elastic``
ELASTIC_ALPHA = (0.0, 900.0)  # nnU-Net v1's magnitude and smoothness of the deformation field (voxels)
ELASTIC_SIGMA = (9.0, 13.0)
# Linear interpolation of the image, as nnU-Net's current (batchgeneratorsv2) pipeline: cubic splines
# prefilter the whole enlarged region and cost ~5x more per 3D patch for no measurable gain.
DATA_ORDER = 1
_PROBABILITIES = ("noise", "blur", "brightness", "contrast", "gamma", "low_resolution")


def scaled(augmentation: Augmentation, strength: float) -> Augmentation:
    """The same augmentation ``strength`` times as strong: probabilities multiplied (capped at 1), the
    rotation angle multiplied and the scale range moved towards / away from 1. 0 turns every random
    transform off except mirroring; 1 returns it unchanged."""
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0, got {strength}")
    probs = {k: min(1.0, getattr(augmentation, k) * strength) for k in _PROBABILITIES}
    lo, hi = augmentation.scale
    return replace(augmentation, **probs, rotation_deg=min(180.0, augmentation.rotation_deg * strength),
                   scale=[max(0.1, 1 + (lo - 1) * strength), 1 + (hi - 1) * strength],
                   elastic=augmentation.elastic and strength > 0)


def _spatial(augmentation: Augmentation) -> bool:
    lo, hi = augmentation.scale
    return augmentation.rotation_deg > 0 or lo != 1 or hi != 1 or augmentation.elastic


def slice_wise(augmentation: Augmentation, ndim: int) -> bool:
    """Whether spatial augmentation is 2D per slice (very anisotropic 3D patches, ``dummy_2d``)."""
    return ndim == 3 and augmentation.dummy_2d


def _plane_extent(a: float, b: float, max_angle: float) -> tuple[float, float]:
    """Largest bounding box of an a x b rectangle rotated by any angle in [0, max_angle] (radians)."""
    angles = np.linspace(0.0, min(max_angle, math.pi / 2), 91)
    c, s = np.abs(np.cos(angles)), np.abs(np.sin(angles))
    return float(np.max(a * c + b * s)), float(np.max(a * s + b * c))


def region_size(patch_size: Sequence[int], augmentation: Augmentation, ndim: int) -> list[int]:
    """The region a patch is cut from before the spatial transform, so that rotation by up to
    ``rotation_deg`` about any one axis and zooming out by ``scale[1]`` stay inside image data (nnU-Net's
    get_patch_size, with the exact bounding box of the rotated patch and the zoom-out factor). Combined
    rotations about several axes can still reach a little beyond it; those voxels are padding."""
    patch = [int(p) for p in patch_size]
    if not _spatial(augmentation):
        return patch
    angle = math.radians(augmentation.rotation_deg)
    plane_axes = [(1, 2)] if slice_wise(augmentation, ndim) else (
        [(0, 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)])
    extent = [float(p) for p in patch]
    for i, j in plane_axes:
        ei, ej = _plane_extent(patch[i], patch[j], angle)
        extent[i], extent[j] = max(extent[i], ei), max(extent[j], ej)
    zoom = max(1.0, float(augmentation.scale[1]))
    region = [math.ceil(e * zoom - 1e-6) for e in extent]
    if slice_wise(augmentation, ndim):
        region[0] = patch[0]
    return region


class SliceWise(AbstractTransform):
    """Run a 2D spatial transform on every slice (axis 0) of 3D patches with one map per sample:
    out-of-plane rotation would smear very anisotropic data (nnU-Net's Convert3DTo2D / 2DTo3D pair)."""

    def __init__(self, transform: AbstractTransform):
        self.transform = transform

    def __call__(self, **batch: np.ndarray) -> dict:
        data, seg = batch["data"], batch["seg"]
        b, c, z = data.shape[:3]
        out = self.transform(data=data.reshape(b, c * z, *data.shape[3:]),
                             seg=seg.reshape(b, seg.shape[1] * z, *seg.shape[3:]))
        batch["data"] = out["data"].reshape(b, c, z, *out["data"].shape[2:])
        batch["seg"] = out["seg"].reshape(b, seg.shape[1], z, *out["seg"].shape[2:])
        return batch


class MaskOutside(AbstractTransform):
    """Zero the channels normalized inside the nonzero mask where the label is -1 (outside it), after the
    intensity transforms moved those voxels: the network sees the same constant there as at inference."""

    def __init__(self, channels: Sequence[int]):
        self.channels = list(channels)

    def __call__(self, **batch: np.ndarray) -> dict:
        outside = batch["seg"][:, 0] < 0
        for c in self.channels:
            batch["data"][:, c][outside] = 0
        return batch


class OutsideToBackground(AbstractTransform):
    """Label -1 (outside the nonzero mask, or padding) becomes background 0, as in nnU-Net."""

    def __call__(self, **batch: np.ndarray) -> dict:
        seg = batch["seg"]
        seg[seg < 0] = 0
        return batch


def spatial_transform(augmentation: Augmentation, patch_size: Sequence[int], ndim: int,
                      p_spatial: float = SPATIAL_P) -> AbstractTransform | None:
    """Rotation / scaling / elastic deformation, linear for the image (0 outside), nearest for the label
    (-1 outside); it centre-crops the enlarged region to the patch. None when nothing spatial is on."""
    if not _spatial(augmentation):
        return None
    two_d = slice_wise(augmentation, ndim)
    angle = math.radians(augmentation.rotation_deg)
    lo, hi = augmentation.scale
    rotation = (-angle, angle)
    no_rotation = (0.0, 0.0)
    transform = SpatialTransform(
        list(patch_size[1:] if two_d else patch_size), patch_center_dist_from_border=None,
        do_elastic_deform=augmentation.elastic, alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA,
        do_rotation=angle > 0, angle_x=rotation, angle_y=rotation if ndim == 3 and not two_d else no_rotation,
        angle_z=rotation if ndim == 3 and not two_d else no_rotation, p_rot_per_axis=1,
        do_scale=(lo, hi) != (1, 1), scale=(lo, hi),
        border_mode_data="constant", border_cval_data=0, order_data=DATA_ORDER,
        border_mode_seg="constant", border_cval_seg=-1, order_seg=0, random_crop=False,
        p_el_per_sample=ELASTIC_P, p_scale_per_sample=p_spatial, p_rot_per_sample=p_spatial,
        independent_scale_for_each_axis=False)
    return SliceWise(transform) if two_d else transform


def intensity_transforms(augmentation: Augmentation, ndim: int) -> list[AbstractTransform]:
    """nnU-Net's intensity transforms with their ranges; each with the probability the plan gives it,
    left out when that is 0."""
    a = augmentation
    keep_axes = (0,) if slice_wise(a, ndim) else None  # no low-resolution simulation across slices
    candidates = [
        (a.noise, lambda p: GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=p)),
        (a.blur, lambda p: GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True,
                                                 p_per_channel=0.5, p_per_sample=p)),
        (a.brightness, lambda p: BrightnessMultiplicativeTransform((0.75, 1.25), p_per_sample=p)),
        (a.contrast, lambda p: ContrastAugmentationTransform(p_per_sample=p)),
        (a.low_resolution, lambda p: SimulateLowResolutionTransform(
            zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5, order_downsample=0, order_upsample=DATA_ORDER,
            p_per_sample=p, ignore_axes=keep_axes)),
        (a.gamma / 3, lambda p: GammaTransform((0.7, 1.5), invert_image=True, per_channel=True,
                                               retain_stats=True, p_per_sample=p)),
        (a.gamma, lambda p: GammaTransform((0.7, 1.5), invert_image=False, per_channel=True,
                                           retain_stats=True, p_per_sample=p)),
    ]
    return [make(min(1.0, p)) for p, make in candidates if p > 0]


def build_transforms(augmentation: Augmentation | None, patch_size: Sequence[int], ndim: int,
                     masked_channels: Sequence[int] = (), p_spatial: float = SPATIAL_P) -> Compose:
    """The whole pipeline for batches {"data": (B, C, *region), "seg": (B, 1, *region)} cut from
    :func:`region_size` regions; ``None`` augments nothing (the region is then the patch) but still masks
    and maps -1 to 0. ``p_spatial`` overrides :data:`SPATIAL_P` (tests use 1)."""
    transforms: list[AbstractTransform] = []
    if augmentation is not None:
        spatial = spatial_transform(augmentation, patch_size, ndim, p_spatial)
        transforms += [spatial] if spatial is not None else []
        transforms += intensity_transforms(augmentation, ndim)
        if augmentation.mirror_axes:
            transforms.append(MirrorTransform(tuple(augmentation.mirror_axes)))
    if masked_channels:
        transforms.append(MaskOutside(masked_channels))
    transforms.append(OutsideToBackground())
    return Compose(transforms)
