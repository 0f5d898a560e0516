"""autoseg: self-configuring AutoML for medical image segmentation.

The stages as functions and the artifacts as types, imported on first use so that ``import autoseg`` stays
light (torch loads only with the stage that needs it)::

    fp = autoseg.extract_fingerprint("Dataset001_Liver")
    result = autoseg.plan_dataset("Dataset001_Liver", budget="20m")      # validate, fingerprint, plan, preprocess
    autoseg.train_dataset("Dataset001_Liver")                            # train, validate, select, bundle
    seg, geometry = autoseg.load_bundle("model.autoseg").predict("case_0000.nii.gz")

docs/architecture.md in the repository describes the modules behind them.
"""

from __future__ import annotations

import importlib
from typing import Any

from autoseg.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "validate_dataset": "autoseg.validate",
    "extract_fingerprint": "autoseg.fingerprint",
    "make_plans": "autoseg.plan.make",
    "plan_dataset": "autoseg.workflow",
    "preprocess": "autoseg.preprocess",
    "train_dataset": "autoseg.workflow",
    "select_model": "autoseg.select",
    "predict": "autoseg.predict",
    "evaluate_folder": "autoseg.evaluate",
    "pack_bundle": "autoseg.bundle",
    "load_bundle": "autoseg.bundle",
    "plan_with_search": "autoseg.search",
    "Fingerprint": "autoseg.schema.fingerprint",
    "Plans": "autoseg.schema.plans",
    "Configuration": "autoseg.schema.plans",
    "Selection": "autoseg.schema.selection",
    "Workdir": "autoseg.workdir",
    "Predictor": "autoseg.inference",
    "Bundle": "autoseg.bundle",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
