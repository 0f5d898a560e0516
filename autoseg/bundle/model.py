"""A loaded bundle: plans, post-processing and weights as plain data, and a :class:`Predictor` built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.bundle.archive import read_archive
from autoseg.bundle.contents import bundle_contents
from autoseg.bundle.layout import weights_member
from autoseg.bundle.runnable import check_runnable
from autoseg.errors import UserError
from autoseg.io import Geometry
from autoseg.nets import layout_of
from autoseg.schema.plans import Plans


@dataclass
class Bundle:
    """A verified bundle held in memory. ``predict`` segments one case; ``predictor`` gives the full
    :class:`autoseg.inference.Predictor` (folders of files, probabilities, options)."""

    source: str
    manifest: dict[str, Any]
    plans: Plans
    postprocessing: dict[str, list[dict]]
    weights: dict[str, dict[int, dict[str, torch.Tensor]]]
    card: str
    _predictors: dict[tuple, Any] = field(default_factory=dict, repr=False)

    @property
    def configuration(self) -> str:
        return self.manifest["configuration"]

    @property
    def segment_codes(self) -> dict[str, dict[str, tuple[str, str, str]]]:
        """The coded segment category and type per class packed with the model, for DICOM SEG output ({}: none;
        checked against the classes when the bundle loaded)."""
        from autoseg.schema.segment_codes import parse_segment_codes

        return parse_segment_codes(self.manifest.get("segment_codes", {}), f"{self.source}: segment_codes")

    def predictor(self, configuration: str | None = None, folds: Sequence[int] | None = None,
                  device: str | torch.device | None = None, **options: Any):
        """A :class:`~autoseg.inference.Predictor` for ``configuration`` alone, or by default the selected model
        (the manifest's ``ensemble``, its instances made by the manifest's ``instances_from``), with ``folds``
        of each member (default: all in the bundle) and the post-processing tuned for that model."""
        from autoseg.inference import Predictor
        from autoseg.schema.selection import model_name

        if configuration is not None:
            names = [configuration]
        else:
            names = [self.configuration] + [c for c in self.manifest.get("ensemble", []) if c != self.configuration]
            options.setdefault("instances_from", self.manifest.get("instances_from"))
        extra = [c for c in [options.get("instances_from")] if c is not None and c not in names]
        chosen = {}
        for name in [*names, *extra]:
            if name not in self.weights:
                raise UserError(f"{self.source}: no configuration '{name}' in the bundle "
                                f"(it has {', '.join(self.weights)})")
            have = sorted(self.weights[name])
            chosen[name] = have if folds is None else sorted(set(folds))
            missing = [k for k in chosen[name] if k not in self.weights[name]]
            if missing:
                raise UserError(f"{self.source}: fold {missing[0]} of '{name}' is not in the bundle "
                                f"(it has fold(s) {', '.join(map(str, have))}); leave it out of --folds")
        options.setdefault("postprocessing", self.postprocessing.get(model_name(names), []))
        options.setdefault("quality", self.manifest.get("quality"))  # the selected model's quality flag
        weights = {n: [self.weights[n][k] for k in ks] for n, ks in chosen.items()}
        return Predictor(self.plans, names, weights, device, folds=chosen, **options)

    def predict(self, image: np.ndarray | Path | str | Sequence[Path | str], geometry: Geometry | None = None, *,
                device: str | None = None, mirror: str = "auto", instances: bool | None = None,
                series: Sequence[str] = ()) -> tuple:
        """Segment one case: an array ``(C, *spatial)`` (with its :class:`~autoseg.io.Geometry`; without it,
        the spacing the model was trained at is assumed), an image file / one file per channel, or a folder of
        DICOM series (``series`` chooses, as ``autoseg predict --series`` does; the label map is then in the
        series' slice order). Returns the label map ``(*spatial)`` and the geometry it is in (the input's); for
        an instance model (its dataset has instance classes) or with ``instances=True`` also the instance map
        ``(*spatial)`` (0 none, 1..N one object each) as a third element.

        >>> seg, geometry = load_bundle("model.autoseg").predict("case_0000.nii.gz")   # doctest: +SKIP
        >>> seg, geometry = load_bundle("model.autoseg").predict("dicom/patient1")     # doctest: +SKIP
        >>> seg, geometry, objects = load_bundle("nuclei.autoseg").predict("cell_0000.png")   # doctest: +SKIP
        """
        from autoseg.io import read_images
        from autoseg.predict_inputs import dicom_case, is_dicom_input, read_case

        where = "image"
        if isinstance(image, (str, Path)) and is_dicom_input(Path(image)):
            case = dicom_case(Path(image), self.plans, series, ".nii.gz")
            image, geometry = read_case(case)
            where = case.where
        elif isinstance(image, (str, Path)) or (isinstance(image, Sequence) and not isinstance(image, np.ndarray)):
            paths = [image] if isinstance(image, (str, Path)) else list(image)
            image, geometry = read_images(paths)
            where = str(paths[0])
        image = np.asarray(image)
        if geometry is None:
            geometry = self.default_geometry(image.ndim - 1)
        key = (device, mirror)
        if key not in self._predictors:
            self._predictors[key] = self.predictor(device=device, mirror=mirror)
        predictor = self._predictors[key]
        result = predictor.predict(image, geometry, instances=instances, where=where)
        if result.instances is None:
            return result.labels, geometry
        return result.labels, geometry, result.instances

    def default_geometry(self, ndim: int) -> Geometry:
        """The identity geometry at the selected configuration's spacing, in the files' axis order."""
        cfg = self.plans.configurations[self.configuration]
        order = self.plans.axis_order or list(range(ndim))
        if cfg.ndim != ndim or len(order) != ndim:
            return Geometry.identity(ndim)
        spacing = [1.0] * ndim
        for i, axis in enumerate(order):
            spacing[axis] = float(cfg.spacing[i])
        return Geometry(tuple(spacing), (0.0,) * ndim, tuple(np.eye(ndim).ravel().tolist()))


def load_bundle(path: Path | str) -> Bundle:
    """Open and verify a ``.autoseg`` bundle: checksums, member paths, no pickles, a known format.

    Nothing in the file runs: the members are JSON and safetensors, read in memory.

    >>> bundle = load_bundle("model.autoseg")                         # doctest: +SKIP
    >>> seg, geometry = bundle.predict(images, geometry)              # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    source = str(path)
    manifest, members = read_archive(path)
    plans, post, card, folds = bundle_contents(source, manifest, members)
    weights: dict[str, dict[int, dict[str, torch.Tensor]]] = {c: {} for c in folds}
    for c, ks in folds.items():
        for k in ks:
            member = weights_member(c, k)
            try:
                weights[c][k] = load_tensors(members.pop(member))  # the bytes go as their tensors come
            except (SafetensorError, ValueError) as e:
                raise UserError(f"{source}: {member} is not a safetensors file ({e})") from e
    check_runnable(source, plans, folds, {(c, k): layout_of(w) for c, ws in weights.items() for k, w in ws.items()})
    return Bundle(source, manifest, plans, post, weights, card)


def is_bundle(path: Path | str) -> bool:
    """A file (not a workdir folder): ``autoseg predict`` treats it as a bundle."""
    return Path(path).is_file()
