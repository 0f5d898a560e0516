"""The bundle: one file that carries everything needed to segment new images, and nothing that executes.

``model.autoseg`` is a zip holding::

    manifest.json        format version, versions of autoseg/torch/numpy, creation time, dataset, the input
                         contract (channels and their order, file ending, dimensions, labels), the selected
                         configuration(s), folds, ensemble, post-processing, cross-validation metrics, the
                         DICOM segment codes per class (``segment_codes``, if given), and
                         the sha256 and size of every other member (the only members a bundle may
                         hold: :mod:`autoseg.bundle.layout`)
    README.md            the model card: what it segments, its input, its labels, its CV Dice, its segment codes
    plans.json           the plans of the bundled configuration(s), ct normalization statistics filled in
    postprocessing.json  the tuned post-processing rules per configuration
    weights/<config>/fold_<k>.safetensors

Loading (:func:`load_bundle`) reads the members in memory, checks each against the manifest and refuses
pickles, escaping paths, unknown members, compression bombs, unknown major versions and damaged files
(:mod:`autoseg.bundle.archive`), and bundles predict could not run: sizes past any real model's, weights
that are not the network the plans build (:mod:`autoseg.bundle.runnable`). :func:`verify_bundle` does the same
checks streaming the weights: a bundle that verifies is a bundle ``autoseg predict`` can load and run.

>>> pack_bundle("autoseg_work/Dataset001_CT", "model.autoseg")       # doctest: +SKIP
>>> seg, geometry = load_bundle("model.autoseg").predict("case_0000.nii.gz")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from autoseg.bundle.archive import FORMAT_VERSION, read_archive
from autoseg.bundle.contents import verify_bundle

if TYPE_CHECKING:
    from autoseg.bundle.model import Bundle, is_bundle, load_bundle
    from autoseg.bundle.pack import pack_bundle

__all__ = ["FORMAT_VERSION", "Bundle", "is_bundle", "load_bundle",
           "pack_bundle", "read_archive", "verify_bundle"]
_NEED_TORCH = {"Bundle": "model", "is_bundle": "model", "load_bundle": "model", "pack_bundle": "pack"}


def __getattr__(name: str):
    """Import the modules that need torch on first use: ``autoseg verify`` reads no tensors, and importing
    torch costs it ~300 MB and seconds."""
    if name in _NEED_TORCH:
        return getattr(importlib.import_module(f"autoseg.bundle.{_NEED_TORCH[name]}"), name)
    raise AttributeError(f"module 'autoseg.bundle' has no attribute {name!r}")

