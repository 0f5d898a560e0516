"""Ensembles: the probabilities of a model's members averaged, and brought back to the input's array.

A model is one configuration or an ensemble of several (``selection.json``'s ``ensemble``, chosen by
:mod:`autoseg.select` on the out-of-fold predictions). Each member is a configuration with its trained folds:
its folds' probabilities are averaged in its own preprocessed space (one buffer, :func:`member_probabilities`),
and the members meet in the one space they share, the original image's array (:func:`combine`)::

    per member: preprocess -> per fold: sliding window (tile softmax, Gaussian-weighted) -> mean over folds
    per class c: sum over members (in ensemble order) of the member's map c restored to the original array
                 -> running argmax (ties to the lower class)

A region model (:mod:`autoseg.regions`) has a sigmoid per region instead of the softmax; its maps are summed
the same way and each region, in ``regions_class_order``, paints its value where the sum exceeds 0.5 per
member (later regions over earlier).

That is exactly the averaging the selection scored: there, each member's out-of-fold probabilities (of the
fold that held the case out, restored to the original array and stored as float16) were summed in ensemble
order and the argmax taken; here each restored map is rounded to float16 the same way before it is added, and
both take the argmax of the sum, not the mean (dividing could round two sums to a tie). Memory at the original
size: the running maximum, the class sum, the label map and one restored class, whatever the number of classes
and members; in preprocessed space, each member's buffer (``K`` maps, float16 by default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from autoseg.nets import build_network
from autoseg.preprocess import restore_to_original
from autoseg.regions import paint
from autoseg.schema.plans import Configuration, Plans
from autoseg.sliding_window import sliding_window

STORAGE = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class Member:
    """One configuration of a model and the weights of its trained folds (networks built on first use)."""

    name: str
    cfg: Configuration
    weights: list[Mapping[str, torch.Tensor]]
    folds: list[int]
    _models: list[torch.nn.Module] | None = field(default=None, repr=False)

    def models(self, plans: Plans, device: torch.device) -> list[torch.nn.Module]:
        if self._models is None:
            self._models = []
            for state in self.weights:
                net = build_network(self.cfg.network, plans.in_channels, plans.num_classes, self.cfg.ndim)
                net.load_state_dict(state)
                self._models.append(net.to(device).eval())
        return self._models

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return tuple(self.cfg.augmentation.mirror_axes)

    def describe(self) -> str:
        return f"{self.name} (fold{'s' if len(self.folds) != 1 else ''} {','.join(map(str, self.folds))})"


@dataclass
class MemberOutput:
    """A member's mean probabilities ``(K, Z, Y, X)`` in its preprocessed space, and how to go back; with the
    touching-object formulation also its mean interior map ``(1, Z, Y, X)`` (not a class: kept apart)."""

    probabilities: torch.Tensor
    properties: dict[str, Any]
    cfg: Configuration
    sigmoid: bool = False  # one independent probability per region (0 outside the crop for every map)
    interior: torch.Tensor | None = None
    fold_labels: list[torch.Tensor] = field(default_factory=list)  # each fold's label map (quality flag), if kept


def member_probabilities(member: Member, plans: Plans, data: np.ndarray, device: torch.device, *,
                         mirror_axes: Sequence[int], overlap: float, tile_batch: int, precision: str,
                         storage: str = "float16", progress: Callable[[int], None] | None = None,
                         fold_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The mean over ``member``'s folds of the sliding-window probabilities of a preprocessed case
    ``(C, Z, Y, X)``: every fold adds ``1 / folds`` into one ``storage`` buffer (no second volume). A member
    with the touching-object formulation returns ``K + 1`` maps, the interior last (:func:`split_interior`).

    ``fold_labels``: a list to append each fold's label map to (argmax, or region masks; for the quality
    flag's fold disagreement), taken from what the fold added to the buffer, so the buffer is the same with
    or without it (one copy of the buffer is held meanwhile)."""
    models = member.models(plans, device)
    extra = member.cfg.network.instance_outputs
    channels = plans.num_classes + extra
    out = torch.zeros((channels, *data.shape[1:]), dtype=STORAGE[storage])
    sigmoid = bool(plans.regions)
    for model in models:
        before = out.clone() if fold_labels is not None and len(models) > 1 else None
        sliding_window(model, data, member.cfg.patch_size, channels, member.cfg.ndim, device,
                       overlap=overlap, mirror_axes=mirror_axes, tile_batch=tile_batch, precision=precision,
                       channels_last=member.cfg.channels_last, progress=progress, out=out, scale=1 / len(models),
                       activation="sigmoid" if plans.regions else "softmax", extra=extra)
        if before is not None:
            added = (out - before)[:plans.num_classes]  # this fold's class maps / folds, in the storage dtype
            fold_labels.append(added > 0.5 / len(models) if sigmoid else added.argmax(0).to(torch.uint8))
            del before, added
    return out


def split_interior(probabilities: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The class maps and the interior map (None without one) of :func:`member_probabilities`' output."""
    if probabilities.shape[0] == num_classes:
        return probabilities, None
    return probabilities[:num_classes], probabilities[num_classes:num_classes + 1]


def restore_class(output: MemberOutput, c: int) -> np.ndarray:
    """Class ``c`` of a member's probabilities in the original image's array (float32; outside the crop:
    softmax background, 1 for class 0 and 0 for the others; every region 0)."""
    p = output.probabilities[c:c + 1].float().numpy()
    fill = 1.0 if c == 0 and not output.sigmoid else 0.0
    return restore_to_original(p, output.properties, output.cfg, is_label=False, fill=fill)[0]


def combine(outputs: Sequence[MemberOutput], probabilities: bool = False,
            regions_class_order: Sequence[int] = (), weights: Mapping[int, float] | None = None
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The label map of the members' mean probabilities in the original array, restored one class at a
    time with a running argmax (the labels of restoring every map and taking the argmax, ties to the lower
    class, holding one class at the original size, not K); with ``probabilities`` also the mean maps
    ``(K, *spatial)`` as float16. With ``regions_class_order`` the maps are regions, each painted in turn
    where present (:func:`autoseg.regions.paint`).

    Each member's restored map is rounded to float16 first, the precision the out-of-fold files keep: the
    label map is then exactly the argmax of those files (of their sum, for an ensemble), so the selection
    scores precisely the model ``autoseg predict`` runs. ``weights``: class -> factor on its summed map before
    the argmax (a tuned ``class_weights`` rule, :func:`autoseg.postprocess.weighted_argmax`); the probabilities
    returned stay unweighted."""
    classes = outputs[0].probabilities.shape[0]
    shape = outputs[0].properties["shape_original"]
    top = max(regions_class_order) if regions_class_order else classes - 1
    seg = np.zeros(shape, np.uint8 if top < 256 else np.uint16)
    maps = np.empty((classes, *shape), np.float16) if probabilities else None
    best = None
    for c in range(classes):
        total = _as_stored(restore_class(outputs[0], c))
        for other in outputs[1:]:
            total += _as_stored(restore_class(other, c))
        if maps is not None:
            maps[c] = total / len(outputs) if len(outputs) > 1 else total
        if regions_class_order:
            paint(seg, total, regions_class_order[c], len(outputs))
            continue
        if weights and c in weights:
            total = total * np.float32(weights[c])
        if best is None:
            best = total
            continue
        better = total > best
        seg[better] = c
        np.maximum(best, total, out=best)
    return seg, maps


def combine_interior(outputs: Sequence[MemberOutput]) -> np.ndarray | None:
    """The mean interior map of the members that have one, in the original array (0 outside the crop);
    None when no member learned one."""
    maps = [restore_to_original(o.interior.float().numpy(), o.properties, o.cfg, is_label=False, fill=0.0)[0]
            for o in outputs if o.interior is not None]
    return sum(maps[1:], maps[0]) / len(maps) if maps else None


def _as_stored(a: np.ndarray) -> np.ndarray:
    """``a`` (float32) rounded to float16 in place: the values an out-of-fold file holds."""
    a[...] = a.astype(np.float16)
    return a
