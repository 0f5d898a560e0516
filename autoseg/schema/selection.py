"""The selection's data model: which model the cross-validation chose and which post-processing was tuned for
it (``selection.json``, written by :mod:`autoseg.select`, read by prediction and the bundle).

A hand-written file may say as little as ``{"configuration": "3d_fullres"}``; every key it does give is checked,
and a bad one is named.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoseg.artifacts import header, json_safe, write_json
from autoseg.errors import UserError
from autoseg.schema.records import build_record

Rules = list[dict[str, Any]]


def model_name(members: list[str] | tuple[str, ...]) -> str:
    """How selection.json and the bundle key a model: its members joined by ``+`` (``2d+3d_fullres``)."""
    return "+".join(members)


@dataclass
class InstanceChoice:
    """Which trained configuration's instance maps ``autoseg predict`` makes (the highest out-of-fold panoptic
    quality), with the scores that chose it: PQ and instance F1 per configuration, pooled over the instance
    classes and the ``cases`` every compared configuration covers. ``methods``: each one's
    ``instances.method``; ``skipped``: configurations left out, and why (a run older than out-of-fold
    instance maps)."""

    configuration: str | None  # None: no configuration had instance maps; predict's model makes its own
    pq: dict[str, float | None] = field(default_factory=dict)
    f1: dict[str, float | None] = field(default_factory=dict)
    cases: int | None = None  # None: the configurations share no case, each was scored on its own
    methods: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class Selection:
    """The chosen model (``ensemble``: its configurations in the order they were added; ``configuration``
    is the first), the scores that chose it, and the post-processing rules tuned per model
    (``postprocessing_by_model``: the ensemble's, and its first configuration's alone for ``--config``);
    for an instance dataset, which configuration's instance maps predict makes (``instances``); the coded
    segment category and type per class that dataset.json gave (``segment_codes``), which the bundle carries."""

    configuration: str
    ensemble: list[str] = field(default_factory=list)
    classes: dict[str, str] = field(default_factory=dict)
    cv: dict[str, Any] = field(default_factory=dict)  # model name -> its out-of-fold scores
    greedy: list[Any] = field(default_factory=list)  # one entry per step of the forward selection
    postprocessing: Rules = field(default_factory=list)  # the selected model's rules
    postprocessing_tuning: dict[str, Any] | None = None  # what was tried for it, and the scores
    postprocessing_by_model: dict[str, Rules] = field(default_factory=dict)
    configuration_postprocessing_tuning: dict[str, Any] | None = None  # the first member's, for an ensemble
    quality: dict[str, Any] | None = None  # the quality flag's calibration for the selected model (autoseg.quality)
    instances: InstanceChoice | None = None  # instance datasets: whose instance maps predict makes (by OOF PQ)
    # class name -> {"category"?, "type": "SCHEME:VALUE:MEANING"}: dataset.json's segment_codes, for DICOM SEG output
    segment_codes: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ensemble:
            self.ensemble = [self.configuration]

    @property
    def model(self) -> str:
        return model_name(self.ensemble)

    def rules_for(self, members: list[str] | tuple[str, ...]) -> Rules:
        """The rules tuned for ``members`` (a configuration alone, or an ensemble in order); none for a
        model that was not tuned."""
        members = list(members)
        if self.postprocessing_by_model:
            return list(self.postprocessing_by_model.get(model_name(members), []))
        tuned = self.postprocessing_tuning  # a file written before postprocessing_by_model
        if isinstance(tuned, dict) and tuned.get("model") == members:
            return list(tuned.get("rules", []))
        return list(self.postprocessing) if members == self.ensemble else []

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("configuration_postprocessing_tuning", "quality", "instances"):
            if d[key] is None:
                del d[key]
        return json_safe({**header("selection"), **d})

    def save(self, path: Path | str) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: Any, source: str = "selection") -> Selection:
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object")
        if d.get("artifact", "selection") != "selection":
            raise UserError(f"{source}: not a selection file (\"artifact\": {d.get('artifact')!r})")
        body = {k: v for k, v in d.items() if k not in ("artifact", "format_version", "autoseg_version")}
        body.pop("ensemble_postprocessing_tuning", None)  # written by early versions, never read
        if "configuration" not in body:
            raise UserError(f"{source}: no 'configuration' in it; run `autoseg select` again, or pass --config")
        if body.get("instances") is None:
            body.pop("instances", None)
        selection = build_record(cls, body, source, nested={"instances": InstanceChoice})
        if selection.ensemble[0] != selection.configuration:
            raise UserError(f"{source}: 'ensemble' {selection.ensemble!r} does not start with its 'configuration' "
                            f"'{selection.configuration}'; run `autoseg select` again, or pass --config")
        return selection

    @classmethod
    def load(cls, path: Path | str) -> Selection:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable ({e}); run `autoseg select` again or delete it") from e
        return cls.from_dict(d, str(path))
