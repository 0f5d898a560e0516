"""Records from JSON, checked key by key: what makes every artifact's loader name the exact key a hand
edit broke (``plans.json: configurations.3d_fullres.patch_size: expected list[int], got [64, "96"]``)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from autoseg.errors import UserError


def build_record(cls: type, d: Any, where: str, nested: dict[str, type] | None = None) -> Any:
    """Build a dataclass from a dict, rejecting unknown keys and wrong types with the key's path."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected an object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}"
        if nested and name in nested:
            sub = nested[name]
            wants_list = str(known[name].type).startswith("list")
            if wants_list != isinstance(value, list):
                raise UserError(f"{key}: expected {'a list of objects' if wants_list else 'an object'}, got {value!r}")
            kwargs[name] = ([build_record(sub, v, f"{key}[{i}]", nested) for i, v in enumerate(value)]
                            if wants_list else build_record(sub, value, key, nested))
        else:
            check_type(known[name].type, value, key)
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from e


def check_type(annotation: str, value: Any, key: str) -> None:
    if not _matches(str(annotation), value):
        raise UserError(f"{key}: expected {annotation}, got {value!r}")


def _split_top(text: str, sep: str) -> list[str]:
    """Split an annotation at ``sep`` outside brackets: 'dict[str, list[int]] | None' -> two parts at '|'."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def _matches(ann: str, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation, elements of lists and dicts included (so an edited
    ``"patch_size": [64, "96", 96]`` is named here instead of failing later inside training)."""
    options = _split_top(ann, "|")
    if len(options) > 1:
        return any(_matches(o, value) for o in options)
    if ann == "None":
        return value is None
    if ann == "Any":
        return True
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    if ann.startswith("list"):
        inner = ann[5:-1] if ann.startswith("list[") else "Any"
        return isinstance(value, list) and all(_matches(inner, v) for v in value)
    if ann.startswith("dict"):
        inner = _split_top(ann[5:-1], ",")[-1] if ann.startswith("dict[") else "Any"
        return isinstance(value, dict) and all(_matches(inner, v) for v in value.values())
    return True  # a type this checker does not know: left to the semantic checks
