"""What ``autoseg predict`` reads: the images (which files make a case, and whether it fits the model) and
which folds the user asked for.

Images to predict follow the nnU-Net naming, one file per channel: ``CASE_0000<ending>``, ``CASE_0001<ending>``…
A single-channel model also takes files without the channel suffix (``scan.nii.gz`` is case ``scan``). A case
that does not fit (a missing or extra channel file, mixed endings, the wrong number of channels or
dimensions) is not an exception for the whole run: it carries one line that names it, and the caller
predicts the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.artifacts import check_not_inputs, check_writable
from autoseg.errors import UserError
from autoseg.io import NATURAL_ENDINGS, SUPPORTED_ENDINGS, file_ending
from autoseg.schema.plans import Plans

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # as in autoseg.dataset


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files in order, the ending its prediction gets, and what is wrong
    with it (None when nothing is known to be)."""

    id: str
    images: tuple[Path, ...]
    ending: str
    where: str  # how messages name the case
    problem: str | None = None


def _contract(plans: Plans) -> str:
    names = ", ".join(plans.channel_names) or "?"
    return f"the model takes {plans.in_channels} channel{'s' if plans.in_channels != 1 else ''}: {names}"


def find_cases(input: Path, plans: Plans) -> list[InputCase]:
    """The cases in folder ``input`` (sorted by id), or the one case that file ``input`` is."""
    input = Path(input)
    if input.is_file():
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


def check_outputs(cases: list[InputCase], output: Path, save_probabilities: bool) -> None:
    """Refuse, before the first case is predicted, an OUTPUT folder that cannot be written or a prediction
    that would replace one of the input images (``scan.nii.gz`` predicted into its own folder)."""
    check_writable(output, folder=True, what="predictions")
    check_not_inputs([f for case in cases for f in output_files(case, output, save_probabilities)],
                     [p for case in cases for p in case.images], "give another OUTPUT folder")


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
