"""The bundle: one file that carries everything needed to segment new images, and nothing that executes.

``model.autoseg`` is a zip holding::

    manifest.json        format version, versions of autoseg/torch/numpy, creation time, dataset, the input
                         contract (channels and their order, file ending, dimensions, labels), the selected
                         configuration(s), folds, ensemble, post-processing, cross-validation metrics, and
                         the sha256 and size of every other member
    README.md            the model card: what it segments, its input, its labels, its CV Dice
    plans.json           the plans of the bundled configuration(s), ct normalization statistics filled in
    postprocessing.json  the tuned post-processing rules per configuration
    weights/<config>/fold_<k>.safetensors

Loading (:func:`load_bundle`) reads the members in memory, checks each against the manifest and refuses
pickles, escaping paths, unknown major versions and damaged files (:mod:`autoseg.bundle.archive`).

>>> pack_bundle("autoseg_work/Dataset001_CT", "model.autoseg")       # doctest: +SKIP
>>> seg, geometry = load_bundle("model.autoseg").predict("case_0000.nii.gz")   # doctest: +SKIP
"""

from autoseg.bundle.archive import FORMAT_VERSION, read_archive
from autoseg.bundle.model import Bundle, is_bundle, load_bundle
from autoseg.bundle.pack import pack_bundle

__all__ = ["FORMAT_VERSION", "Bundle", "is_bundle", "load_bundle",
           "pack_bundle", "read_archive", "verify_bundle"]


def verify_bundle(path) -> str:
    """Check a bundle fully (as loading does, weights parsed too); a one-line summary, or :class:`UserError`."""
    b = load_bundle(path)
    folds = sum(len(f) for f in b.weights.values())
    return (f"{path}: OK (format {b.manifest['format_version']}, {len(b.manifest['members']) + 1} members, "
            f"checksums match; {b.plans.dataset_name}, configuration {b.configuration}, {folds} fold(s))")
