"""Which DICOM series a prediction takes: the only one, or the one the user named (``--series UID`` or its
SeriesDescription); a model of several channels takes one series per channel by an explicit mapping
(``--series 0=UID --series 1=T2``), never by guessing which scan is which. The channels meet on the first
one's grid (:func:`channel_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from autoseg.dicom.series import DicomFolder, DicomSeries
from autoseg.errors import UserError

logger = logging.getLogger(__name__)
GRID_ATOL = 1e-3  # mm (spacing, origin) and direction cosines within which two series share a grid


def _listing(series: Sequence[DicomSeries]) -> str:
    return "; ".join(s.describe() for s in series)


def _match(found: DicomFolder, selector: str, flag: str) -> DicomSeries:
    by_uid = found.by_uid(selector)
    if by_uid is not None:
        return by_uid
    for exact in (True, False):
        named = [s for s in found.series
                 if (s.description == selector if exact else s.description.lower() == selector.lower())]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise UserError(f"{found.root}: {flag}: {len(named)} series are described '{selector}'; give a "
                            f"SeriesInstanceUID instead: {_listing(named)}")
    other = next((o for o in found.objects if o.series_uid == selector), None)
    if other is not None:
        raise UserError(f"{other.path}: {flag}: a {other.modality or 'DICOM'} object ({other.sop_class}), not an "
                        f"image series; choose one of {_listing(found.series)}")
    raise UserError(f"{found.root}: {flag}: no series with that SeriesInstanceUID or description; found "
                    f"{_listing(found.series)}")


def parse_choices(choices: Sequence[str]) -> dict[int, str]:
    """``--series`` values as channel -> selector: ``UID`` / ``DESCRIPTION`` (channel 0) or ``K=...``."""
    mapping: dict[int, str] = {}
    for text in choices:
        channel, sep, selector = text.partition("=")
        if sep and channel.strip().isdigit():
            k, selector = int(channel), selector.strip()
        else:
            k, selector = 0, text.strip()
            if len(choices) > 1:
                raise UserError(f"--series {text}: with several --series, say which channel each is "
                                "(--series 0=UID --series 1=UID)")
        if not selector:
            raise UserError(f"--series {text}: give a SeriesInstanceUID or a series description")
        if k in mapping:
            raise UserError(f"--series {text}: channel {k} is given twice")
        mapping[k] = selector
    return mapping


def choose_series(found: DicomFolder, choices: Sequence[str], channel_names: Sequence[str]) -> list[DicomSeries]:
    """One series per channel of the model (``channel_names``, in order), or one line saying what to choose."""
    if not found.series:
        if found.objects:
            first = found.objects[0]
            more = f" (and {len(found.objects) - 1} other non-image object(s))" if len(found.objects) > 1 else ""
            raise UserError(f"{first.path}: a {first.modality or 'DICOM'} object ({first.sop_class}), not a slice "
                            f"of an image series{more}; {found.root} holds no image series to predict")
        raise UserError(f"{found.root}: no DICOM image series found")
    n = len(channel_names)
    mapping = parse_choices(choices)
    contract = f"the model takes {n} channel{'s' if n != 1 else ''}: {', '.join(channel_names) or '?'}"
    if not mapping:
        if n == 1 and len(found.series) == 1:
            return [found.series[0]]
        if n == 1:
            raise UserError(f"{found.root}: {len(found.series)} image series; choose one with --series UID or "
                            f"--series DESCRIPTION: {_listing(found.series)}")
        raise UserError(f"{found.root}: {contract}; map a series to each with --series 0=UID --series 1=UID ...; "
                        f"found {_listing(found.series)}")
    extra = sorted(k for k in mapping if k >= n)
    missing = [k for k in range(n) if k not in mapping]
    if extra or missing:
        what = "; ".join(part for part in (f"no channel {', '.join(map(str, extra))}" if extra else "",
                                           f"no series for channel {', '.join(map(str, missing))}"
                                           if missing else "") if part)
        raise UserError(f"--series: {what} ({contract})")
    chosen = [_match(found, mapping[k], f"--series {k}={mapping[k]}" if n > 1 else f"--series {mapping[k]}")
              for k in range(n)]
    return chosen


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=GRID_ATOL)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GRID_ATOL)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=GRID_ATOL))


def check_channels(chosen: Sequence[DicomSeries]) -> list[bool]:
    """Whether each chosen series must be resampled onto channel 0's grid (False: it is on it); one from another
    frame of reference (FrameOfReferenceUID) on another grid is refused: its coordinates mean nothing in
    channel 0's space without a registration."""
    first = chosen[0].image
    frame = str(chosen[0].datasets[0].get("FrameOfReferenceUID", ""))
    needs = [False]
    for k, series in enumerate(chosen[1:], start=1):
        same = _same_grid(series.image, first)
        if not same and (not frame or str(series.datasets[0].get("FrameOfReferenceUID", "")) != frame):
            raise UserError(f"{series.files[0]}: series {series.uid} (channel {k}) is on another grid than channel "
                            f"0's series {chosen[0].uid} and in another frame of reference; register and resample "
                            "it onto channel 0's grid first")
        needs.append(not same)
    return needs


def channel_images(chosen: Sequence[DicomSeries]) -> list[sitk.Image]:
    """The chosen series' images on channel 0's grid. A series on another grid of the same frame of reference
    (the scanner placed both in one patient space, as in one MR session) is resampled onto it, linearly, with
    a warning (:func:`check_channels` refuses the others)."""
    images = [chosen[0].image]
    for k, (series, resample) in enumerate(zip(chosen, check_channels(chosen))):
        if k == 0:
            continue
        if not resample:
            images.append(series.image)
            continue
        low = float(sitk.GetArrayViewFromImage(series.image).min())
        images.append(sitk.Resample(series.image, images[0], sitk.Transform(), sitk.sitkLinear, low,
                                    sitk.sitkFloat32))
        logger.warning(f"{series.files[0]}: series {series.uid} (channel {k}) resampled onto the grid of channel 0's "
                       f"series {chosen[0].uid} (same frame of reference)")
    return images
