"""What ``autoseg predict`` reads: the images (which files make a case, whether it fits the model, whether it
fits in memory once resampled, and whether it looks like anything the model saw) and which folds the user
asked for.

Images to predict follow the nnU-Net naming, one file per channel: ``CASE_0000<ending>``, ``CASE_0001<ending>``…
A single-channel model also takes files without the channel suffix (``scan.nii.gz`` is case ``scan``). A case
that does not fit (a missing or extra channel file, mixed endings, the wrong number of channels or
dimensions) is not an exception for the whole run: it carries one line that names it, and the caller
predicts the others.

Before a case is resampled to the model's spacing, its resampled size is estimated from its header
(:func:`check_size`): a spacing of 100 mm where the model works at 1 mm would ask for a million times the
voxels, and is refused with one line unless the caller allows it. A case the model can run but cannot have
seen anything like (NaN voxels, a constant image, a spacing an order of magnitude away from the model's) is
predicted with a warning naming it (:func:`unusual_input`).

A folder of DICOM files is one case: the image series found in it (:mod:`autoseg.dicom.series`), the only one
or the one ``--series`` names, one series per channel for a model of several (:mod:`autoseg.dicom.choose`);
its prediction is written as a label file (the model's ending unless ``--output-format`` says another) or as a
DICOM object referencing the series (``--output-format seg`` or ``rtstruct``).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.artifacts import check_not_inputs, check_writable
from autoseg.errors import UserError
from autoseg.io import (
    MEDICAL_ENDINGS,
    NATURAL_ENDINGS,
    SUPPORTED_ENDINGS,
    Geometry,
    available_memory,
    file_ending,
    read_images,
)
from autoseg.preprocess import axis_order3, new_spacing
from autoseg.resample import target_shape
from autoseg.schema.plans import Configuration, Plans
from autoseg.validate import nifti_stored_nonfinite

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # as in autoseg.dataset
SPACING_RATIO_WARN = 10.0  # a case's spacing this many times finer or coarser than the model's gets a warning


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files in order, the ending its prediction gets, and what is wrong
    with it (None when nothing is known to be). A DICOM case has its series, one per channel
    (:class:`autoseg.dicom.series.DicomSeries`), and ``images`` lists their files."""

    id: str
    images: tuple[Path, ...]
    ending: str
    where: str  # how messages name the case
    problem: str | None = None
    series: tuple[Any, ...] = ()

    @property
    def dicom_format(self) -> str | None:
        """``seg`` or ``rtstruct`` when the prediction is written as that DICOM object, else None."""
        from autoseg.dicom.output import DICOM_FORMATS

        return next((f for f, e in DICOM_FORMATS.items() if self.ending == e), None) if self.series else None


def _contract(plans: Plans) -> str:
    names = ", ".join(plans.channel_names) or "?"
    return f"the model takes {plans.in_channels} channel{'s' if plans.in_channels != 1 else ''}: {names}"


def output_ending(output_format: str | None, dicom: bool, plans: Plans) -> str | None:
    """The ending ``--output-format`` gives predictions (None: the input's own), checked against the input."""
    from autoseg.dicom.output import DICOM_FORMATS, check_available

    if output_format is None:
        return (plans.file_ending if plans.file_ending in MEDICAL_ENDINGS else ".nii.gz") if dicom else None
    if output_format in DICOM_FORMATS:
        if not dicom:
            raise UserError(f"--output-format {output_format}: needs DICOM input (the object references the image "
                            "series it segments); INPUT holds image files")
        check_available(output_format)
        return DICOM_FORMATS[output_format]
    ending = "." + output_format.lstrip(".")
    if ending not in SUPPORTED_ENDINGS:
        raise UserError(f"--output-format {output_format}: expected one of "
                        f"{', '.join(e[1:] for e in SUPPORTED_ENDINGS)}, {', '.join(DICOM_FORMATS)}")
    return ending


def is_dicom_input(input: Path) -> bool:
    """A folder without image files autoseg reads directly, holding DICOM files (in it or below)."""
    from autoseg.dicom.series import is_dicom_folder

    return (input.is_dir() and not any(p.is_file() and file_ending(p) in SUPPORTED_ENDINGS for p in input.iterdir())
            and is_dicom_folder(input))


def find_cases(input: Path, plans: Plans, series: Sequence[str] = (), output_format: str | None = None
               ) -> list[InputCase]:
    """The cases in folder ``input`` (sorted by id), or the one case that file ``input`` is; a folder of
    DICOM files is one case (its series chosen by ``series``, see :mod:`autoseg.dicom.choose`).
    ``output_format``: the ending (or DICOM object) predictions get instead of the input's."""
    input = Path(input)
    dicom = is_dicom_input(input)
    ending = output_ending(output_format, dicom, plans)
    if dicom:
        return [dicom_case(input, plans, series, ending)]
    if series:
        raise UserError(f"--series: {input} is not a folder of DICOM files")
    cases = _file_cases(input, plans)
    return [replace(c, ending=ending) for c in cases] if ending else cases


def dicom_case(folder: Path, plans: Plans, choices: Sequence[str], ending: str) -> InputCase:
    """The one case a folder of DICOM series is: the series chosen for each channel, named after the folder,
    their images read and their grids checked (a missing slice, a cut file, channels from two frames of
    reference: one :class:`UserError` naming a file)."""
    from autoseg.dicom.choose import check_channels, choose_series
    from autoseg.dicom.series import find_series

    chosen = choose_series(find_series(folder), choices, list(plans.channel_names))
    check_channels(chosen)  # reads the images now: a broken series is one line before any model work
    cid = re.sub(r"[^\w.-]+", "_", folder.resolve().name) or "dicom"
    return InputCase(cid, tuple(f for s in chosen for f in s.files), ending, str(folder), series=tuple(chosen))


def read_case(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """A case's channels ``(C, *spatial)`` float32 and its geometry: its files, or its DICOM series on the first
    one's grid (:func:`autoseg.dicom.choose.channel_images`)."""
    if not case.series:
        return read_images(case.images)
    import SimpleITK as sitk

    from autoseg.dicom.choose import channel_images

    images = channel_images(case.series)
    geometry = Geometry(tuple(float(v) for v in reversed(images[0].GetSpacing())), tuple(images[0].GetOrigin()),
                        tuple(images[0].GetDirection()))
    return np.stack([sitk.GetArrayFromImage(i) for i in images]).astype(np.float32, copy=False), geometry


def _file_cases(input: Path, plans: Plans) -> list[InputCase]:
    if input.is_file():
        if input.suffix.lower() == ".dcm":
            raise UserError(f"{input}: a DICOM file; give the folder holding its series (autoseg reads whole series)")
        if file_ending(input) not in SUPPORTED_ENDINGS:
            raise UserError(f"{input}: not an image file autoseg reads (endings: {', '.join(SUPPORTED_ENDINGS)})")
        files, folder = [input], input.parent
    elif input.is_dir():
        files = [p for p in sorted(input.iterdir()) if not p.name.startswith(".") and p.is_file()
                 and file_ending(p) in SUPPORTED_ENDINGS]  # hidden: macOS "._x", our temporary files
        folder = input
    else:
        raise UserError(f"{input}: no such file or folder")
    groups: dict[str, list[tuple[int | None, Path]]] = {}
    for p in files:
        stem = p.name[: -len(file_ending(p))]
        m = CHANNEL_RE.match(stem)
        cid, channel = (m["case"], int(m["channel"])) if m else (stem, None)
        groups.setdefault(cid, []).append((channel, p))
    where = (lambda cid: str(input)) if input.is_file() else (lambda cid: str(folder / cid))
    return [_case(cid, groups[cid], plans, where(cid)) for cid in sorted(groups)]


def _case(cid: str, files: list[tuple[int | None, Path]], plans: Plans, where: str) -> InputCase:
    endings = sorted({file_ending(p) for _, p in files})
    ending = endings[0]
    paths = tuple(p for _, p in sorted(files, key=lambda f: -1 if f[0] is None else f[0]))

    def bad(problem: str) -> InputCase:
        return InputCase(cid, paths, ending, where, f"{where}: {problem}")

    if len(endings) > 1:
        return bad(f"channel files with different endings ({', '.join(endings)}); use one format per case")
    n = plans.in_channels
    channels = [c for c, _ in files]
    if None in channels:
        if len(files) > 1:
            return bad(f"both {cid}{ending} and {cid}_XXXX{ending} files; keep one naming")
        if n > 1:
            return bad(f"{paths[0].name} is not named CASE_XXXX{ending} ({_contract(plans)}, one file each)")
        return InputCase(cid, paths, ending, where)
    natural = ending in NATURAL_ENDINGS  # an RGB file holds several channels
    missing = [c for c in range(max(channels) + 1 if natural else n) if c not in channels and c < n]
    extra = [c for c in channels if c >= n]
    named = {"missing": missing, "unexpected": extra}
    parts = [f"{kind} channel file(s) {', '.join(f'{cid}_{c:04d}{ending}' for c in cs)}"
             for kind, cs in named.items() if cs]
    if parts:
        return bad(f"{'; '.join(parts)} ({_contract(plans)})")
    return InputCase(cid, paths, ending, where)


def expected_ndim(plans: Plans) -> int | None:
    """Spatial dimensions of the images the model was trained on (None when the plan does not say)."""
    if len(plans.axis_order) in (2, 3):
        return len(plans.axis_order)
    return 3 if any(c.ndim == 3 for c in plans.configurations.values()) else None


def check_images(images: np.ndarray, plans: Plans, where: str) -> None:
    """Refuse images ``(C, *spatial)`` the model cannot take: the wrong channel count or dimensionality."""
    if images.shape[0] != plans.in_channels:
        raise UserError(f"{where}: {images.shape[0]} channel(s) in the image file(s) but {_contract(plans)}")
    nd, want = images.ndim - 1, expected_ndim(plans)
    if want is not None and nd != want:
        raise UserError(f"{where}: a {nd}D image, but the model was trained on {want}D images")


def output_files(case: InputCase, output: Path, save_probabilities: bool) -> list[Path]:
    """The files predicting ``case`` into folder ``output`` writes (:meth:`autoseg.inference.Predictor.write`)."""
    files = [Path(output) / f"{case.id}{case.ending}"]
    return files + [Path(output) / f"{case.id}.npz"] if save_probabilities else files


def check_outputs(cases: list[InputCase], output: Path, save_probabilities: bool, instances: bool = False) -> None:
    """Refuse, before the first case is predicted, an OUTPUT folder that cannot be written or a prediction
    that would replace one of the input images (``scan.nii.gz`` predicted into its own folder); with
    ``instances`` the instance maps (``OUTPUT/instances/CASE<ending>``) count too."""
    check_writable(output, folder=True, what="predictions")
    extra = [output / "instances" / f"{case.id}{case.ending}" for case in cases] if instances else []
    check_not_inputs([f for case in cases for f in output_files(case, output, save_probabilities)] + extra,
                     [p for case in cases for p in case.images], "give another OUTPUT folder")


def _resampled(shape: Sequence[int], geometry: Geometry, plans: Plans, cfg: Configuration
               ) -> tuple[list[float], list[float], list[int]]:
    """(the case's spacing, the model's, the resampled shape) in the plan's axis order, as
    :func:`autoseg.preprocess.preprocess_case` will resample it (before its crop: an upper bound)."""
    order = axis_order3(plans.axis_order, len(shape))
    shape3, spacing3 = ([1, *shape], [1.0, *geometry.spacing]) if len(shape) == 2 else (shape, geometry.spacing)
    spacing = [float(spacing3[a]) for a in order]
    target = new_spacing(cfg, spacing)
    return spacing, target, target_shape([shape3[a] for a in order], spacing, target)


def prediction_bytes(voxels: int, channels: int, classes: int, storage_bytes: int) -> int:
    """Memory a case of ``voxels`` resampled voxels needs in one member: the resampled image (float32 per
    channel, twice while it is resampled) and the probabilities (one map per class, ``storage_bytes`` each)."""
    return voxels * (2 * 4 * channels + classes * storage_bytes)


def check_size(shape: Sequence[int], geometry: Geometry, plans: Plans, configurations: Sequence[Configuration],
               where: str, storage_bytes: int = 2, available: int | None = None) -> None:
    """Refuse a case ``(*spatial)`` whose resampling to the model's spacing would need more memory than this
    machine has available (``available`` bytes; default: what the system reports now), before anything is
    allocated: one line naming the case, its spacing, the resampled shape and the memory it needs."""
    available = available_memory() if available is None else available
    if available is None:
        return
    sizes = [_resampled(shape, geometry, plans, cfg) for cfg in configurations]  # every member's at once
    need = sum(prediction_bytes(math.prod(r), plans.in_channels, plans.num_classes, storage_bytes) for *_, r in sizes)
    if need > available:
        spacing, target, resampled = max(sizes, key=lambda size: math.prod(size[2]))
        raise UserError(f"{where}: spacing {_mm(spacing)} mm resampled to the model's {_mm(target)} mm is "
                        f"{'x'.join(map(str, resampled))} voxels, which needs {need / 2**30:.1f} GiB of memory "
                        f"({available / 2**30:.1f} GiB available); check the image's spacing (its header), "
                        "or pass --allow-large to try anyway")


def unusual_input(images: np.ndarray, geometry: Geometry, plans: Plans, configurations: Sequence[Configuration],
                  where: str, files: Sequence[Path] = ()) -> list[str]:
    """Warnings (one line each, naming the case) for an image ``(C, *spatial)`` the model can run but cannot
    have seen anything like: NaN or infinite voxels, a channel holding one value everywhere (a blank image:
    whatever is labelled in it is noise), a spacing :data:`SPACING_RATIO_WARN` times finer or coarser than
    the model's on some axis (a wrong header, or another kind of image: the resampled case is too small or
    too large for the anatomy the model learned). ``files``: the case's image files; a float NIfTI among
    them is scanned for the NaN and Inf its reader turns into 0 (training data is validated the same way)."""
    found = []
    bad = int(np.count_nonzero(~np.isfinite(images))) if np.issubdtype(images.dtype, np.floating) else 0
    if bad:
        found.append(f"{where}: {bad} NaN or infinite voxel(s); the model never saw such values and its "
                     "prediction is meaningless around them (everywhere, with per-image normalization)")
    else:
        stored = sum(sum(nifti_stored_nonfinite(f)) for f in files if file_ending(f) in (".nii", ".nii.gz"))
        if stored:
            found.append(f"{where}: {stored} NaN or infinite voxel(s) stored in its NIfTI file(s), which the "
                         "reader turns into 0; the model saw no such holes, its prediction around them is suspect")
    names = list(plans.channel_names)
    for c in range(images.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN channel
            low, high = (np.nanmin(images[c]), np.nanmax(images[c])) if bad else (images[c].min(), images[c].max())
        if low == high or (bad and math.isnan(float(low))):
            name = f" ({names[c]})" if c < len(names) else ""
            found.append(f"{where}: channel {c}{name} holds one value ({float(low):g}) everywhere: a blank image; "
                         "any label predicted in it is noise")
    for cfg in configurations:
        spacing, target, resampled = _resampled(images.shape[1:], geometry, plans, cfg)
        axes = range(3) if cfg.ndim == 3 else range(1, 3)
        ratios = [spacing[a] / target[a] for a in axes if target[a] > 0]
        if any(not (1 / SPACING_RATIO_WARN <= r <= SPACING_RATIO_WARN) for r in ratios):
            found.append(f"{where}: spacing {_mm(spacing)} mm is far from the model's {_mm(target)} mm "
                         f"({SPACING_RATIO_WARN:g}x or more on an axis; resampled to {'x'.join(map(str, resampled))} "
                         "voxels); check the image's header: the model saw nothing at that scale")
            break
    return found


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:.4g}" for v in values)


# --- the model: which configuration and folds -------------------------------------------------------


def parse_folds(text: str | None) -> list[int] | None:
    """``--folds``: ``all`` (or None) for every trained fold, else comma-separated fold numbers."""
    if text is None or text.strip() == "all":
        return None
    try:
        folds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        folds = []
    if not folds or any(k < 0 for k in folds):
        raise UserError(f"--folds {text}: expected 'all' or fold numbers like 0,1")
    return folds
