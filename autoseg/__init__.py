"""autoseg: self-configuring AutoML for medical image segmentation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from os import PathLike

    from autoseg.bundle import Bundle

__version__ = "0.1.0"


def load_bundle(path: str | PathLike[str]) -> Bundle:
    """Open and verify a ``model.autoseg`` bundle, e.g. ``autoseg.load_bundle(path).predict(image)``
    (:func:`autoseg.bundle.load_bundle`, imported on first use so that ``import autoseg`` stays light)."""
    from autoseg.bundle import load_bundle as _load

    return _load(path)
