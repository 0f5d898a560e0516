"""The instance map of a Mask R-CNN member (``instances.method`` "detections"): each fold detects the objects of
the preprocessed image, the folds' detections are merged by mask voting (:func:`autoseg.nets.maskrcnn.vote_instances`)
and the map goes back to the original image's array with nearest-neighbour resampling (ids are not ordered
values to interpolate). The inference engine calls it beside the member's probabilities.

Why not connected components of the label map: touching objects of one class merge there; the detections keep
them apart. The label map still comes from the probabilities (what the out-of-fold selection scored), so each
object keeps only its pixels the label map gives its class, and ids are renumbered 1..N.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from autoseg.ensemble import Member
from autoseg.nets.maskrcnn import detections_of, vote_instances
from autoseg.preprocess import restore_to_original
from autoseg.schema.plans import Plans


def is_detector(member: Member) -> bool:
    return member.cfg.instances.method == "detections"


def detected_instances(member: Member, plans: Plans, data: np.ndarray, properties: dict[str, Any],
                       device: torch.device) -> tuple[np.ndarray, list[dict]]:
    """The member's instance map of a preprocessed case ``(C, 1, Y, X)`` in the original image's array (int32,
    0 none, 1..N), and per id its class (``label``) and mean score over the folds."""
    image = torch.from_numpy(np.array(data[:, 0], dtype=np.float32)).to(device)  # a copy: the cache is read-only
    per_fold = [detections_of(model, image, k) for k, model in enumerate(member.models(plans, device))]
    voted, objects = vote_instances(per_fold)
    if not per_fold or not any(per_fold):
        voted = np.zeros(data.shape[2:], np.int32)
    nearest = replace(member.cfg, resampling=replace(member.cfg.resampling, label_order=0, z_order=0))
    restored = restore_to_original(voted[None].astype(np.int32), properties, nearest, is_label=True, fill=0)
    return restored, objects


def agree_with_labels(instances: np.ndarray, objects: list[dict], seg: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Each object reduced to its pixels where ``seg`` has its class; objects left empty dropped; ids 1..N."""
    out = np.zeros(instances.shape, np.int32)
    kept: list[dict] = []
    for i, obj in enumerate(objects, start=1):
        pixels = (instances == i) & (seg == obj["label"])
        if pixels.any():
            kept.append(obj)
            out[pixels] = len(kept)
    return out, kept
