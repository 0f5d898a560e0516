"""Coded segment categories and types (DICOM SEG's SegmentedPropertyCategory/TypeCodeSequence) per class,
as every source holds them: a ``--segment-codes`` file, dataset.json's ``segment_codes``, selection.json and a
bundle manifest, all the JSON object ``{"liver": {"category": "SCT:91723000:Anatomical Structure", "type":
"SCT:10200004:Liver"}}`` (``category`` optional), read and checked here the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.errors import UserError

GENERIC_CATEGORY = ("SCT", "91723000", "Anatomical Structure")
GENERIC_TYPE = ("SCT", "85756007", "Tissue")
Codes = dict[str, dict[str, tuple[str, str, str]]]  # class name -> {"category"?, "type": (scheme, value, meaning)}


def parse_code(text: str, where: str) -> tuple[str, str, str]:
    """``SCHEME:VALUE:MEANING`` (``SCT:10200004:Liver``) as a triple, or one line saying what is wrong."""
    parts = [p.strip() for p in str(text).split(":", 2)]
    if len(parts) != 3 or not all(parts):
        raise UserError(f"{where}: code {text!r} is not SCHEME:VALUE:MEANING (e.g. SCT:10200004:Liver)")
    return parts[0], parts[1], parts[2]


def parse_segment_codes(raw: Any, where: str) -> Codes:
    """Codes as a file, dataset.json's ``segment_codes``, selection.json or a bundle manifest hold them (the
    JSON object :func:`codes_to_json` writes), checked the same way wherever they come from."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object mapping class names to {{'category': ..., 'type': ...}}")
    codes = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) - {"category", "type"} or "type" not in entry:
            raise UserError(f"{where}: {name}: expected {{'category': 'SCHEME:VALUE:MEANING', 'type': "
                            "'SCHEME:VALUE:MEANING'}")
        codes[name] = {key: parse_code(value, f"{where}: {name}.{key}") for key, value in entry.items()}
    return codes


def codes_to_json(codes: Mapping[str, Mapping[str, tuple[str, str, str]]]) -> dict[str, dict[str, str]]:
    """Codes as the JSON object :func:`parse_segment_codes` reads back (``"SCT:10200004:Liver"`` strings)."""
    return {name: {key: ":".join(code) for key, code in entry.items()} for name, entry in codes.items()}


def merge_codes(base: Mapping[str, Mapping[str, tuple[str, str, str]]] | None,
                override: Mapping[str, Mapping[str, tuple[str, str, str]]] | None) -> Codes:
    """``base`` (the model's codes) with ``override`` (the user's file) replacing them class by class: a class
    the file names takes the file's entry whole, the others keep the model's."""
    return {name: dict(entry) for name, entry in {**(base or {}), **(override or {})}.items()}


def check_codes(codes: Mapping[str, Any], class_names: Sequence[str], source: Path | str,
                owner: str = "the model") -> None:
    """Refuse codes that name a class ``owner`` does not have (a typo would leave that class generic)."""
    unknown = [name for name in codes if name not in class_names]
    if unknown:
        raise UserError(f"{source}: {', '.join(map(repr, unknown))} is not a class of {owner} "
                        f"(its classes: {', '.join(class_names)})")
