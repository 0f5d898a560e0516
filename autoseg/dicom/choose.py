"""Which DICOM series a prediction takes: the only one, or the one the user named (``--series UID`` or its
SeriesDescription); a model of several channels takes one series per channel by an explicit mapping
(``--series 0=UID --series 1=T2``), never by guessing which scan is which.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoseg.dicom.series import DicomFolder, DicomSeries
from autoseg.errors import UserError


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
