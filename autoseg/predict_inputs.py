"""What ``autoseg predict`` reads: the images (which files make a case, and whether it fits the model) and
the model's workdir (which configuration, which trained folds).

Images to predict follow the nnU-Net naming, one file per channel: ``CASE_0000<ending>``, ``CASE_0001<ending>``…
A single-channel model also takes files without the channel suffix (``scan.nii.gz`` is case ``scan``). A case
that does not fit (a missing or extra channel file, mixed endings, the wrong number of channels or
dimensions) is not an exception for the whole run: it carries one line that names it, and the caller
predicts the others.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autoseg.checkpoint import FINAL
from autoseg.errors import UserError
from autoseg.io import NATURAL_ENDINGS, SUPPORTED_ENDINGS, file_ending
from autoseg.plan.model import PLANS_FILE, Plans

SELECTION_FILE = "selection.json"  # written by the selection stage: {"configuration": name, "ensemble": [...], ...}
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


def choose_configuration(workdir: Path, plans: Plans, configuration: str | None) -> str:
    """``configuration``, else ``selection.json``'s ``configuration``, else the first of the planned runs."""
    source = "--config"
    if configuration is None and (workdir / SELECTION_FILE).is_file():
        try:
            configuration = json.loads((workdir / SELECTION_FILE).read_text())["configuration"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{workdir / SELECTION_FILE}: no 'configuration' in it ({e}); "
                            "fix or delete the file, or pass --config") from e
        source = str(workdir / SELECTION_FILE)
    if configuration is None:
        runs = [r["configuration"] for r in plans.train_runs if r.get("configuration") in plans.configurations]
        return runs[0] if runs else next(iter(plans.configurations))
    if configuration not in plans.configurations:
        raise UserError(f"{source}: configuration '{configuration}' is not in {workdir / PLANS_FILE} "
                        f"(it has {', '.join(plans.configurations)})")
    return configuration


def choose_model(workdir: Path, plans: Plans, configuration: str | None) -> list[str]:
    """The configurations whose probabilities ``autoseg predict`` averages, in order: ``configuration`` alone,
    else ``selection.json``'s ``ensemble`` (one configuration or several), else :func:`choose_configuration`'s."""
    first = choose_configuration(workdir, plans, configuration)
    if configuration is not None or not (workdir / SELECTION_FILE).is_file():
        return [first]
    ensemble = json.loads((workdir / SELECTION_FILE).read_text()).get("ensemble") or [first]
    if not isinstance(ensemble, list) or ensemble[0] != first:
        raise UserError(f"{workdir / SELECTION_FILE}: 'ensemble' {ensemble!r} does not start with its 'configuration' "
                        f"'{first}'; run `autoseg select` again, or pass --config")
    missing = [c for c in ensemble if c not in plans.configurations]
    if missing:
        raise UserError(f"{workdir / SELECTION_FILE}: ensemble member '{missing[0]}' is not in {workdir / PLANS_FILE} "
                        f"(it has {', '.join(plans.configurations)}); run `autoseg select` again, or pass --config")
    return list(ensemble)


def trained_folds(workdir: Path, configuration: str, folds: Sequence[int] | None = None) -> list[int]:
    """The folds of ``configuration`` with a final checkpoint (those asked for must all have one)."""
    from autoseg.train import RUNS_DIR, run_folder

    if folds is not None:
        missing = [k for k in folds if not (run_folder(workdir, configuration, k) / FINAL).is_file()]
        if missing:
            raise UserError(f"{run_folder(workdir, configuration, missing[0]) / FINAL}: fold {missing[0]} is not "
                            f"trained; train it (`autoseg train --fold {missing[0]}`) or leave it out of --folds")
        return sorted(set(folds))
    found = sorted(int(p.parent.name[5:]) for p in (workdir / RUNS_DIR / configuration).glob(f"fold_*/{FINAL}")
                   if p.parent.name[5:].isdigit())
    if not found:
        raise UserError(f"{workdir / RUNS_DIR / configuration}: no trained fold (no fold_*/{FINAL}); "
                        f"run `autoseg train` first")
    return found


def with_resolved_normalization(plans: Plans, workdir: Path) -> Plans:
    """Fill a hand-written ``ct`` scheme's statistics from the fingerprint, as preprocessing did."""
    from autoseg.fingerprint import FINGERPRINT_FILE, Fingerprint
    from autoseg.normalize import resolve

    needs = any(n.scheme == "ct" and None in (n.clip_low, n.clip_high, n.mean, n.std)
                for c in plans.configurations.values() for n in c.normalization)
    if not needs or not (workdir / FINGERPRINT_FILE).is_file():
        return plans
    channels = Fingerprint.load(workdir / FINGERPRINT_FILE).channels
    configs = {k: replace(c, normalization=resolve(c.normalization, channels)) for k, c in plans.configurations.items()}
    return replace(plans, configurations=configs)
