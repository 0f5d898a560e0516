"""The inference engine: every prediction of a case goes through :class:`Predictor`, so the numbers the
cross-validation reports describe exactly what ``autoseg predict`` writes. Its users: the out-of-fold
validation of a trained fold (:mod:`autoseg.oof`), the search's scoring of a trial (:mod:`autoseg.search`),
``autoseg predict`` on a workdir or a bundle (:mod:`autoseg.predict`) and ``load_bundle(...).predict``.

The model is one configuration or an ensemble of several (each with its trained folds; :mod:`autoseg.ensemble`)::

    read channels -> per member: preprocess_case -> per fold: sliding-window probabilities -> mean over folds
    -> per class: the members' maps restored to the original array and summed (times the factor of a tuned
       ``class_weights`` rule), running argmax
       (region models: a sigmoid per region, each painted in ``regions_class_order`` where above 0.5)
    -> post-processing rules (:mod:`autoseg.postprocess`, tuned on the model's out-of-fold labels)
    -> write with the input's geometry

A case already in the preprocessed cache (a held-out training case) enters after ``preprocess_case``: the
cache holds exactly what ``preprocess_case`` makes of the raw files, so both entries give the same output.

>>> predictor = Predictor.from_workdir("autoseg_work/Dataset001_CT")            # doctest: +SKIP
>>> seg, probs = predictor.predict_case(images, geometry, probabilities=True)   # doctest: +SKIP
>>> predictor.predict_files("imagesTs", "predictions")                          # doctest: +SKIP

Test-time mirroring (``mirror="auto"``): averaging the ``2**m`` flips of each tile costs ``2**m`` network
passes, cheap on a GPU and a minute per case for a CT on a laptop CPU. The first case decides, on the device
at hand: one batch of tiles is timed per member, and mirroring is on when the first case predicted with it is
estimated to take at most :data:`MIRROR_AUTO_MAX_S` seconds of network time (tiles x folds x flips, summed
over the members). The decision then holds for every case, so a folder is predicted one way.

Memory: each member's fold-mean probabilities in its preprocessed space, one buffer of ``K`` maps in
``storage`` (float16 by default: half of float32; each tile's addition rounds once, see
:mod:`autoseg.sliding_window`), the preprocessed images of the members, and at the original size a running
maximum, the label map and the class being restored, whatever the number of classes. ``probabilities=True``
adds the float16 maps. With ``jobs`` > 1 the next case's buffers exist while the last one is exported.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.artifacts import atomic_write_bytes, write_probabilities
from autoseg.checkpoint import load_weights
from autoseg.detected_instances import agree_with_labels, detected_instances, is_detector
from autoseg.device import AUTOCAST, precision_on, resolve_device, sync
from autoseg.ensemble import (
    STORAGE,
    Member,
    MemberOutput,
    combine,
    combine_interior,
    member_probabilities,
    split_interior,
)
from autoseg.errors import UserError
from autoseg.instances import InstanceRow, instance_table, instances_from_labels, rows_to_csv, split_touching
from autoseg.io import Geometry, write_label
from autoseg.normalize import resolve_plans
from autoseg.postprocess import apply_postprocessing, parse_rules, split_weights
from autoseg.predict_inputs import (
    InputCase,
    check_images,
    check_outputs,
    check_size,
    find_cases,
    read_case,
    unusual_input,
)
from autoseg.preprocess import preprocess_case
from autoseg.quality import (
    QUALITY_FILE,
    CaseQuality,
    InputFeatures,
    ModelFeatures,
    QualityModel,
    assess,
    input_features,
    model_features,
    write_quality,
)
from autoseg.schema.plans import Plans
from autoseg.schema.selection import model_name
from autoseg.sliding_window import count_tiles
from autoseg.workdir import Workdir

logger = logging.getLogger(__name__)
MIRROR_AUTO_MAX_S = 20.0  # network seconds per case, with mirroring, below which ``auto`` turns it on
TILE_BAR_MIN = 64  # network passes in a case from which a progress bar over its tiles is shown
INSTANCES_FOLDER = "instances"  # OUT/instances/CASE<ending>: the instance maps beside the label maps
INSTANCES_TABLE = "instances.csv"  # OUT/instances.csv: one row per instance of every case


@dataclass
class PredictionSummary:
    """What :meth:`Predictor.predict_files` did: files written, cases refused (case -> reason), cases predicted
    with warnings (case -> lines: inputs unlike anything the model saw), mirroring, and the model (members and
    folds)."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    mirror: str = ""
    seconds: float = 0.0
    model: str = ""
    instances: int = 0  # instances written to OUT/instances.csv (instance models, or --instances)
    cases: int = 0  # cases predicted and written
    quality: dict[str, CaseQuality] = field(default_factory=dict)  # case -> its quality verdict (autoseg.quality)
    quality_file: Path | None = None  # OUTPUT/quality.json, when the model carries a quality calibration


@dataclass
class CasePrediction:
    """One case predicted (:meth:`Predictor.predict`): the label map in the input's array, and for an instance
    model (or when asked) the instance map there too (0 none, 1..N) with its table; the probabilities when
    asked."""

    labels: np.ndarray
    instances: np.ndarray | None = None
    table: list[InstanceRow] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    quality: CaseQuality | None = None  # the quality verdict, when the model has a calibrated flag


@dataclass
class _Prepared:
    """A case between the network and the export (which may run in a background thread)."""

    outputs: list[MemberOutput]
    geometry: Geometry
    # a Mask R-CNN member's preprocessed image (2D: small), kept for its detections (:meth:`Predictor.detected`)
    detector_input: tuple[Member, np.ndarray, dict] | None = None
    features: InputFeatures | None = None  # for the quality flag, when the model has one
    model: ModelFeatures | None = None


class Predictor:
    """A model (one configuration, or an ensemble of several) with its trained folds, ready to segment
    images held in memory or files on disk.

    Construct from plain data, so a workdir (:meth:`from_workdir`) and a bundle build it the same way:
    ``configuration`` is one name with ``weights`` one state_dict per fold (``folds`` their numbers), or the
    ensemble's names in order with ``weights`` and ``folds`` mappings from each name to its own. Networks
    are built on first use. ``mirror`` is ``"auto"``, ``"on"`` or ``"off"`` (see the module docstring);
    ``tile_batch`` tiles go through the network at once (default: the training batch, at least 4);
    ``storage`` is the dtype of the probabilities in preprocessed space (``"float16"`` or ``"float32"``).
    A case whose resampling would need more memory than is available is refused unless ``allow_large``.
    ``instances`` (None: when the plan has instance classes) also makes instance maps and their table: the
    touching-object split for members that learned an interior, else connected components per class.
    ``instances_from``: the configuration whose outputs make them instead (``selection.json``'s instance
    choice, by out-of-fold panoptic quality: :mod:`autoseg.select`): its detections, its interior + watershed,
    or components, always on the model's label map; one outside the model (its ``weights`` and ``folds`` given
    with the members') runs beside it for the instances alone.
    ``quality``: a calibrated quality flag (:class:`autoseg.quality.QualityModel`, or its dict as
    ``selection.json`` and a bundle's manifest hold it): each case is then assessed (``last_quality``;
    ``predict_files`` writes ``quality.json``).
    """

    def __init__(self, plans: Plans, configuration: str | Sequence[str],
                 weights: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
                 device: str | torch.device | None = None, *,
                 folds: Sequence[int] | Mapping[str, Sequence[int]] | None = None, mirror: str = "auto",
                 overlap: float = 0.5, tile_batch: int | None = None, progress: bool = False,
                 postprocessing: Sequence[Mapping[str, Any]] = (), storage: str = "float16",
                 allow_large: bool = False, instances: bool | None = None,
                 quality: QualityModel | Mapping[str, Any] | None = None, instances_from: str | None = None):
        names = [configuration] if isinstance(configuration, str) else list(configuration)
        if isinstance(configuration, str):
            weights, folds = {configuration: weights}, None if folds is None else {configuration: folds}
        if not names:
            raise ValueError("a model needs at least one configuration")
        self.semantic = len(names)  # members[:semantic] make the label map; one more may make the instances
        if instances is False or (instances is None and not plans.instance_classes):
            instances_from = None  # no instance maps: nothing to run a configuration for
        if instances_from is not None and instances_from not in names:
            names.append(instances_from)
        for name in names:
            if name not in plans.configurations:
                raise UserError(f"plans.json has no configuration '{name}' "
                                f"(it has {', '.join(plans.configurations)})")
            if not weights.get(name):
                raise UserError(f"no trained fold of configuration '{name}' to predict with")
        if mirror not in ("auto", "on", "off"):
            raise ValueError(f"mirror must be auto, on or off, not {mirror!r}")
        if not 0 <= overlap < 1:
            raise UserError(f"--overlap {overlap}: must be in [0, 1)")
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {', '.join(STORAGE)}, not {storage!r}")
        self.plans = plans
        self.members = [Member(n, plans.configurations[n], list(weights[n]),
                               list(folds[n]) if folds is not None else list(range(len(weights[n]))))
                        for n in names]
        self.device = resolve_device(device)
        self.mirror, self.overlap, self.progress, self.storage = mirror, overlap, progress, storage
        self._tile_batch = tile_batch
        self.allow_large = allow_large
        self.last_warnings: list[str] = []  # the last case's unusual_input warnings (also logged)
        self._mirror_on: bool | None = {"on": True, "off": False}.get(mirror)
        self.mirror_note = "" if mirror == "auto" else f"mirroring {mirror} (--mirror {mirror})"
        self.postprocessing = parse_rules([dict(r) for r in postprocessing])  # applied to every label map
        self.class_weights, self._label_rules = split_weights(self.postprocessing)  # the first at the argmax
        self.instances = bool(plans.instance_classes) if instances is None else bool(instances)
        self.instances_from = instances_from
        self.quality = QualityModel.from_dict(quality) if isinstance(quality, Mapping) else quality
        self.last_quality: CaseQuality | None = None  # the last predict_case's verdict (with ``quality``)
        self._features: InputFeatures | None = None

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: Workdir | Path | str, configuration: str | None = None,
                     folds: Sequence[int] | None = None, device: str | torch.device | None = None,
                     **options: Any) -> Predictor:
        """Load ``WORKDIR/plans.json`` and the final checkpoint of each trained fold of each member.

        The model: ``configuration`` alone, else the ensemble ``WORKDIR/selection.json`` chose (one
        configuration or several), else the first of the plan's training runs. ``folds`` None means every
        fold trained so far (one is enough); given, every member must have them. The post-processing rules
        ``selection.json`` tuned for that model are applied to its labels; the selected model makes its
        instances with the configuration ``selection.json`` chose for them (``instances_from``).
        """
        work = Workdir.of(workdir)
        plans = resolve_plans(work.load_plans(), work.fingerprint_or_none())
        names = work.model(plans, configuration)
        selection = work.load_selection()
        if configuration is None and options.get("instances") is not False:
            options.setdefault("instances_from", work.instance_configuration(plans))
        extra = [c for c in [options.get("instances_from")] if c is not None and c not in names]
        chosen = {n: work.trained_folds(n, folds) for n in [*names, *extra]}
        options.setdefault("postprocessing", parse_rules(selection.rules_for(names), str(work.selection_file))
                           if selection is not None else [])
        options.setdefault("quality", selection.quality if selection is not None else None)
        weights = {n: [load_weights(work.run(n, k).final, plans.configurations[n].network, plans.in_channels,
                                    plans.num_classes, plans.configurations[n].ndim) for k in ks]
                   for n, ks in chosen.items()}
        return cls(plans, names, weights, device, folds=chosen, **options)

    # --- what the model is -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return model_name([m.name for m in self.members[:self.semantic]])

    @property
    def instance_members(self) -> list[Member]:
        """The members whose outputs make the instances: ``instances_from``, else the model's."""
        if self.instances_from is None:
            return self.members[:self.semantic]
        return [m for m in self.members if m.name == self.instances_from]

    @property
    def cfg(self):
        """The first member's configuration (the only one of a single-configuration model)."""
        return self.members[0].cfg

    @property
    def folds(self) -> list[int]:
        return self.members[0].folds

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return self.members[0].mirror_axes

    def describe(self) -> str:
        """One line: the members and their folds, and the post-processing (what ``autoseg predict`` prints)."""
        kind = "ensemble" if self.semantic > 1 else "configuration"
        rules = len(self.postprocessing)
        made = ""
        if self.instances and self.instances_from is not None:
            method = self.plans.configurations[self.instances_from].instances.method
            made = f", instances from {self.instances_from} ({method})"
        return (f"{kind} {' + '.join(m.describe() for m in self.members[:self.semantic])}, "
                f"{rules} post-processing rule{'s' if rules != 1 else ''}, {self.storage} probabilities{made}")

    def tile_batch(self, member: Member) -> int:
        return self._tile_batch or max(4, member.cfg.batch_size)

    # --- one case in memory ------------------------------------------------------------------------
    def predict_case(self, images: np.ndarray, geometry: Geometry, probabilities: bool = False,
                     where: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
        """Segment one case ``(C, *spatial)``: the label map ``(*spatial)`` in the input's array, and with
        ``probabilities`` the per-class maps ``(K, *spatial)`` (float16) there too."""
        prep = self._run(self._preprocess(images, geometry, where), geometry)
        seg, maps = self._export(prep, probabilities)
        self.last_quality = self._assess(prep, seg)
        return seg, maps

    def predict(self, images: np.ndarray, geometry: Geometry, *, probabilities: bool = False,
                instances: bool | None = None, case_id: str = "image", where: str = "image") -> CasePrediction:
        """Segment one case ``(C, *spatial)``; with ``instances`` (None: the predictor's setting, on for a model
        whose plan has instance classes) also its instance map and table (``case_id`` names it there)."""
        prep = self._run(self._preprocess(images, geometry, where), geometry)
        return self._case(prep, case_id, probabilities, self.instances if instances is None else instances)

    @property
    def instance_classes(self) -> dict[int, str]:
        """Label value -> name of the classes made into instances: the plan's instance classes, else (when
        asked for a model without them) every class the label map paints."""
        names = self.plans.class_names
        if self.plans.instance_classes:
            return {v: names[v] for v in self.plans.instance_values}
        if self.plans.regions:
            return {v: name for v, name in zip(self.plans.regions_class_order, self.plans.scored_classes.values())}
        return dict(names)

    def _case(self, prep: _Prepared, case_id: str, probabilities: bool, instances: bool) -> CasePrediction:
        seg, maps = self._export(prep, probabilities or instances)
        verdict = self.last_quality = self._assess(prep, seg)
        if not instances:
            return CasePrediction(seg, probabilities=maps, quality=verdict)
        inst = self.instance_map(seg, prep)
        rows = instance_table(case_id, inst, seg, prep.geometry, self.instance_classes,
                              maps if not self.plans.regions else None)
        return CasePrediction(seg, inst, rows, maps if probabilities else None, verdict)

    def instance_map(self, seg: np.ndarray, prep: _Prepared) -> np.ndarray:
        """Instances of a case's label map, made by :attr:`instance_members`: a Mask R-CNN member's detections
        (:meth:`detected`), else the touching-object split where members learned an interior (their mean
        interior map seeds a watershed), else the connected components of each class."""
        detected = self.detected(prep, seg)
        if detected is not None:  # a Mask R-CNN member: its own objects, mask-voted over its folds
            return detected[0]
        makers = self.instance_members
        names = {m.name for m in makers}
        interior = combine_interior([o for m, o in zip(self.members, prep.outputs) if m.name in names])
        classes = list(self.instance_classes)
        if interior is None:
            return instances_from_labels(seg, classes)
        threshold = next(m.cfg.instances.threshold for m in makers if m.cfg.network.instance_outputs)
        return split_touching(seg, interior, classes, threshold)

    def predict_preprocessed(self, cases: list[tuple[np.ndarray, dict]], probabilities: bool = False
                             ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_case` of a case already preprocessed for each member (``(data, properties)`` in
        member order, as the cache holds them; the geometry is the properties')."""
        geometry = Geometry.from_dict(cases[0][1]["geometry"])
        return self._export(self._run(list(cases), geometry), probabilities)

    def predict_preprocessed_case(self, cases: list[tuple[np.ndarray, dict]], *, probabilities: bool = False,
                                  instances: bool | None = None, case_id: str = "image") -> CasePrediction:
        """:meth:`predict` of a case already preprocessed for each member (as :meth:`predict_preprocessed`):
        the out-of-fold validation's instance maps come from the same :meth:`instance_map` as predict's."""
        geometry = Geometry.from_dict(cases[0][1]["geometry"])
        prep = self._run(list(cases), geometry)
        return self._case(prep, case_id, probabilities, self.instances if instances is None else instances)

    def write(self, seg: np.ndarray, maps: np.ndarray | None, geometry: Geometry, folder: Path, case_id: str,
              ending: str) -> list[Path]:
        """``folder/CASE<ending>`` with ``geometry`` and, with ``maps``, ``folder/CASE.npz``: the files of one
        prediction, for ``autoseg predict`` and the out-of-fold validation alike."""
        path = Path(folder) / f"{case_id}{ending}"
        write_label(seg, geometry, path)
        written = [path]
        if maps is not None:
            write_probabilities(maps, Path(folder) / f"{case_id}.npz")
            written.append(Path(folder) / f"{case_id}.npz")
        return written

    @staticmethod
    def write_instances(instances: np.ndarray, geometry: Geometry, folder: Path, case_id: str, ending: str) -> Path:
        """``folder/CASE<ending>``: one case's instance map (ids, 16 bits where 8 do not hold them), for
        ``autoseg predict`` (``OUT/instances/``) and the out-of-fold validation (``validation/instances/``)."""
        path = Path(folder) / f"{case_id}{ending}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label(instances, geometry, path, ids=True)
        return path

    @torch.inference_mode()
    def preprocessed_probabilities(self, data: np.ndarray, member: int = 0) -> torch.Tensor:
        """Probabilities ``(K, Z, Y, X)`` of a case preprocessed for ``members[member]``, the mean over its folds."""
        return split_interior(self._probabilities(self.members[member], data), self.plans.num_classes)[0]

    def _probabilities(self, member: Member, data: np.ndarray,
                       fold_labels: list[torch.Tensor] | None = None) -> torch.Tensor:
        axes = member.mirror_axes if self._mirror_on else ()
        passes = count_tiles(data.shape[1:], member.cfg.patch_size, member.cfg.ndim, self.overlap) * len(member.folds)
        bar = self._tile_bar(passes, 2 ** len(axes))
        try:
            return member_probabilities(member, self.plans, data, self.device, mirror_axes=axes, overlap=self.overlap,
                                        tile_batch=self.tile_batch(member),
                                        precision=precision_on(member.cfg.precision, self.device),
                                        storage=self.storage, progress=bar.update if bar is not None else None,
                                        fold_labels=fold_labels)
        finally:
            if bar is not None:
                bar.close()

    def _preprocess(self, images: np.ndarray, geometry: Geometry, where: str,
                    files: Sequence[Path] = ()) -> list[tuple[np.ndarray, dict]]:
        """Each member's preprocessed image and properties (all made first: the first case's mirroring decision
        needs every member's tile count), once the case is known to fit in memory (unless ``allow_large``) and
        what in it the model cannot have seen is logged (``last_warnings``; ``files``: where it was read)."""
        check_images(images, self.plans, where)
        configurations = [m.cfg for m in self.members]
        if not self.allow_large:
            check_size(images.shape[1:], geometry, self.plans, configurations, where,
                       STORAGE[self.storage].itemsize)
        self.last_warnings = unusual_input(images, geometry, self.plans, configurations, where, files)
        for line in self.last_warnings:
            logger.warning(line)
        self._features = input_features(images, geometry) if self.quality is not None else None
        return [preprocess_case(images, geometry, m.cfg, self.plans)[::2] for m in self.members]

    def _run(self, cases: list[tuple[np.ndarray, dict]], geometry: Geometry) -> _Prepared:
        """Each member's probabilities of one case; ``cases`` is emptied as it goes, so each preprocessed image
        is freed after its member's sliding window."""
        self._decide_mirror([data.shape[1:] for data, _ in cases])
        outputs, detector = [], None
        makers = {m.name for m in self.instance_members}
        for member in self.members:
            data, props = cases.pop(0)
            folds: list[torch.Tensor] | None = [] if self.quality is not None else None
            classes, interior = split_interior(self._probabilities(member, data, folds), self.plans.num_classes)
            outputs.append(MemberOutput(classes, props, member.cfg, bool(self.plans.regions), interior,
                                        folds or []))
            if is_detector(member) and detector is None and member.name in makers:
                detector = (member, data, props)
            del data
        if self.quality is None:
            return _Prepared(outputs, geometry, detector)
        model = model_features(outputs[:self.semantic], self.quality.expected)
        for output in outputs:
            output.fold_labels = []  # only the agreement is kept
        return _Prepared(outputs, geometry, detector, self._features, model)

    def _assess(self, prep: _Prepared, seg: np.ndarray) -> CaseQuality | None:
        """The quality verdict on one case's label map (None when the model has no calibrated flag)."""
        if self.quality is None or prep.model is None or prep.features is None:
            return None
        return assess(self.quality, prep.features, prep.model, seg, prep.geometry.spacing)

    def detected(self, prep: _Prepared, seg: np.ndarray) -> tuple[np.ndarray, list[dict]] | None:
        """The instance map of a model with a Mask R-CNN member (its first): the folds' detections mask-voted,
        in the input's array, each object on the pixels ``seg`` (the case's label map) gives its class; with
        per id its class and score. None for other models."""
        if prep.detector_input is None:
            return None
        member, data, props = prep.detector_input
        return agree_with_labels(*detected_instances(member, self.plans, data, props, self.device), seg)

    def _export(self, prep: _Prepared, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        order = self.plans.regions_class_order if self.plans.regions else ()
        seg, maps = combine(prep.outputs[:self.semantic], probabilities, order, self.class_weights)
        if self._label_rules:
            seg = apply_postprocessing(seg, self._label_rules, prep.geometry.spacing)
        return seg, maps

    # --- mirroring decision --------------------------------------------------------------------------
    def _decide_mirror(self, shapes: Sequence[Sequence[int]]) -> bool:
        """Decide ``--mirror auto`` on the first case (``shapes``: each member's preprocessed shape)."""
        mirrored = [(m, s) for m, s in zip(self.members, shapes) if m.mirror_axes]
        if not mirrored:
            if self._mirror_on is None or self._mirror_on:
                self.mirror_note = "mirroring off (the plan trains without mirror augmentation)"
            self._mirror_on = False
        if self._mirror_on is None:
            estimate = 0.0
            for member, shape in mirrored:
                tiles = count_tiles(shape, member.cfg.patch_size, member.cfg.ndim, self.overlap)
                batches = math.ceil(tiles / self.tile_batch(member))
                estimate += self._time_tile_batch(member) * batches * len(member.folds) * 2 ** len(member.mirror_axes)
            flips = "/".join(str(2 ** len(m.mirror_axes)) for m, _ in mirrored)
            self._mirror_on = mirror_rule(estimate)
            self.mirror_note = (f"mirroring {'on' if self._mirror_on else 'off'} (--mirror auto: {flips} flips, "
                                f"~{estimate:.1f} s of network time per case with them on {self.device.type}, "
                                f"limit {MIRROR_AUTO_MAX_S:.0f} s)")
        return self._mirror_on

    @torch.inference_mode()
    def _time_tile_batch(self, member: Member) -> float:
        """Seconds for one batch of tiles through one fold's network of ``member`` on this device: the fastest
        of three passes after a warm-up one (the least disturbed by other work on the machine)."""
        cfg = member.cfg
        model = member.models(self.plans, self.device)[0]
        x = torch.randn(self.tile_batch(member), self.plans.in_channels, *cfg.patch_size, device=self.device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if cfg.ndim == 3 else torch.channels_last)
        amp = AUTOCAST.get(precision_on(cfg.precision, self.device))
        times = []
        for _ in range(4):
            sync(self.device)
            t = time.perf_counter()
            with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(x)
            sync(self.device)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    def _tile_bar(self, passes: int, flips: int):
        if not self.progress or passes * flips < TILE_BAR_MIN:
            return None
        from tqdm import tqdm

        return tqdm(total=passes, desc="tiles", unit="tile", leave=False, dynamic_ncols=True)

    # --- files ---------------------------------------------------------------------------------------
    def predict_files(self, input: Path | str, output: Path | str, save_probabilities: bool = False,
                      jobs: int = 1, report: Callable[[str], None] | None = None,
                      report_model: Callable[[str], None] | None = None, series: Sequence[str] = (),
                      output_format: str | None = None, segment_codes: Mapping | None = None
                      ) -> PredictionSummary:
        """Predict every case of ``input`` (a folder in the ``CASE_XXXX<ending>`` naming, or one file) into
        ``output/CASE<ending>`` with the input's spacing, origin and direction; with ``save_probabilities``
        also ``output/CASE.npz`` (``probabilities``: float16, ``(K, *spatial)``).

        A folder of DICOM files is one case, named after the folder: the series ``series`` chooses
        (:func:`autoseg.dicom.choose.choose_series`). ``output_format`` replaces the input's ending (``nii.gz``,
        ``nrrd``, ...) or writes a DICOM object referencing the series (``seg``, ``rtstruct``; its segments
        coded from ``segment_codes``, :func:`autoseg.dicom.seg.read_segment_codes`).

        OUTPUT is checked before the first case: a folder that cannot be written, or a prediction that would
        replace one of the input images (``case.nii.gz`` predicted into its own folder), is one
        :class:`UserError`; the folders it creates are removed again when no case is written.
        A case that breaks the input contract (channels, dimensionality, unreadable file, more memory than
        is available once resampled) is skipped with one line passed to ``report`` and recorded in the
        summary; the other cases are still predicted. A case the model cannot have seen anything like is
        predicted with warnings (logged, and in the summary's ``warnings``).
        ``report_model`` is given :meth:`describe` before the first case.
        With a calibrated quality flag (``quality``), ``output/quality.json`` holds each case's verdict
        (:mod:`autoseg.quality`), written after the last case, replacing the last run's.
        ``jobs`` > 1 exports (restore + write) in ``jobs - 1`` threads while the network runs the next case.
        With :attr:`instances` also ``output/instances/CASE<ending>`` (the instance map, the input's geometry)
        and ``output/instances.csv`` (every case's instances, written when all cases are done).
        """
        from tqdm import tqdm

        t0 = time.perf_counter()
        out = Path(output)
        cases = find_cases(Path(input), self.plans, series, output_format)
        if not cases:
            raise UserError(f"{input}: no images to predict (expected CASE_XXXX{self.plans.file_ending} files)")
        check_outputs(cases, out, save_probabilities, self.instances)  # nothing written: a folder we cannot fill, an input
        created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if nothing is written
        out.mkdir(parents=True, exist_ok=True)
        summary = PredictionSummary(model=self.describe())
        if report_model is not None:
            report_model(summary.model)
        pool = ThreadPoolExecutor(jobs - 1) if jobs > 1 else None
        pending: deque[tuple[InputCase, Future]] = deque()
        table: dict[str, list[InstanceRow]] = {}

        def fail(case: InputCase, message: str) -> None:
            summary.failed[case.id] = message
            if report is not None:
                report(message)

        def finish(case: InputCase, job: Callable[[], list[Path]]) -> None:
            try:
                summary.written += job()
                summary.cases += 1
            except UserError as e:
                fail(case, str(e))

        bar = tqdm(cases, desc="predict", unit="case", disable=not self.progress, dynamic_ncols=True)
        try:
            for case in bar:
                if case.problem:
                    fail(case, case.problem)
                    continue
                try:
                    images, geometry = read_case(case)
                    cases = self._preprocess(images, geometry, case.where, case.images)
                    if self.last_warnings:
                        summary.warnings[case.id] = list(self.last_warnings)
                    del images  # the raw image goes before the networks run
                    prep = self._run(cases, geometry)
                except UserError as e:
                    fail(case, str(e))
                    continue

                def job(prep: _Prepared = prep, case: InputCase = case) -> list[Path]:
                    return self._write(prep, case, out, save_probabilities, table, summary, segment_codes)

                if pool is None:
                    finish(case, job)
                else:
                    pending.append((case, pool.submit(job)))
                    while len(pending) > jobs - 1:
                        c, f = pending.popleft()
                        finish(c, f.result)
            while pending:
                c, f = pending.popleft()
                finish(c, f.result)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if not summary.written:
                _remove_empty(created)
        if self.instances and summary.written:
            rows = [row for cid in sorted(table) for row in table[cid]]
            atomic_write_bytes(rows_to_csv(rows).encode(), out / INSTANCES_TABLE)
            summary.written.append(out / INSTANCES_TABLE)
            summary.instances = len(rows)
        if summary.quality and self.quality is not None:
            summary.quality_file = write_quality(summary.quality, self.quality, out / QUALITY_FILE)
        summary.mirror = self.mirror_note
        summary.seconds = time.perf_counter() - t0
        return summary

    def _write(self, prep: _Prepared, case: InputCase, out: Path, save_probabilities: bool,
               table: dict[str, list[InstanceRow]], summary: PredictionSummary,
               segment_codes: Mapping | None = None) -> list[Path]:
        result = self._case(prep, case.id, save_probabilities, self.instances)
        if result.quality is not None:
            summary.quality[case.id] = result.quality
        if case.dicom_format is None:
            written = self.write(result.labels, result.probabilities, prep.geometry, out, case.id, case.ending)
        else:
            from autoseg.dicom.output import write_dicom_labels

            written = [write_dicom_labels(case.dicom_format, result.labels, case.series[0], self.plans.labels,
                                          out / f"{case.id}{case.ending}", segment_codes)]
            if result.probabilities is not None:
                write_probabilities(result.probabilities, out / f"{case.id}.npz")
                written.append(out / f"{case.id}.npz")
        if result.instances is not None:  # a DICOM case's instance map is written as NIfTI
            ending = case.ending if case.dicom_format is None else ".nii.gz"
            written.append(self.write_instances(result.instances, prep.geometry, out / INSTANCES_FOLDER, case.id,
                                                ending))
            table[case.id] = result.table
        return written


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders ``predict_files`` created (deepest first) when no case was written into them."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process wrote there), or gone
            return


def mirror_rule(seconds_with_mirroring: float, limit: float = MIRROR_AUTO_MAX_S) -> bool:
    """``--mirror auto``: on when the network time of a case with every flip stays within ``limit``."""
    return seconds_with_mirroring <= limit
