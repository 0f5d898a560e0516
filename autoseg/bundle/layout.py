"""The members a bundle may hold, by name, and what each must parse as: the one place that spells them.

Anything else in a bundle is refused, whatever its name ends with: a member the format does not define
is at best dead weight and at worst a payload waiting for a careless reader.
"""

from __future__ import annotations

import json
import math
import re

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card
PLANS_MEMBER = "plans.json"  # the bundled model's plans (the same artifact as a workdir's)
POSTPROCESSING = "postprocessing.json"
_WEIGHTS = re.compile(r"weights/(?P<configuration>[A-Za-z0-9][A-Za-z0-9_.+-]*)/fold_(?P<fold>0|[1-9][0-9]{0,3})"
                      r"\.safetensors")

JSON, TEXT, SAFETENSORS = "JSON", "UTF-8 text", "safetensors"
_FIXED = {MANIFEST: JSON, CARD: TEXT, PLANS_MEMBER: JSON, POSTPROCESSING: JSON}
MAX_HEADER_BYTES = 16 << 20  # a safetensors header (a few KB per hundred tensors)
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# safetensors' dtype names as torch spells them (autoseg.nets.layout_of)
SAFETENSORS_TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
                            "F8_E4M3": "float8_e4m3fn", "I16": "int16", "U16": "uint16", "F16": "float16",
                            "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
                            "U64": "uint64", "F64": "float64"}


def weights_member(configuration: str, fold: int) -> str:
    return f"weights/{configuration}/fold_{fold}.safetensors"


def weights_of(name: str) -> tuple[str, int] | None:
    """(configuration, fold) of a weights member's name, or None for any other name."""
    m = _WEIGHTS.fullmatch(name)
    return (m["configuration"], int(m["fold"])) if m else None


def member_kind(name: str) -> str | None:
    """What the member ``name`` must parse as (:data:`JSON`, :data:`TEXT`, :data:`SAFETENSORS`), or None
    when the bundle format has no member of that name."""
    if name in _FIXED:
        return _FIXED[name]
    return SAFETENSORS if weights_of(name) is not None else None


def format_problem(kind: str, data: bytes, size: int) -> str | None:
    """Why ``data`` (a whole text member, or a safetensors member's leading bytes) is not ``kind``, or None."""
    if kind == SAFETENSORS:
        return safetensors_problem(data, size)
    try:
        text = data.decode("utf-8")
        if kind == JSON and not isinstance(json.loads(text), dict):
            return "not a JSON object"
    except (ValueError, RecursionError) as e:
        return f"{type(e).__name__}: {str(e)[:80]}"
    return None if kind in (JSON, TEXT) else f"unknown kind {kind}"


def safetensors_problem(head: bytes, size: int) -> str | None:
    """Why a safetensors file of ``size`` bytes starting with ``head`` (its header at least) is not one, or
    None: the header is JSON naming each tensor's dtype, shape and byte range, and the ranges must tile the
    rest of the file exactly (what the safetensors loader itself checks before reading a tensor)."""
    if size < 10 or len(head) < 8:
        return "shorter than a safetensors header"
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES:
        return f"its header claims {n} bytes, more than a header may hold ({MAX_HEADER_BYTES})"
    if 8 + n > size or len(head) < 8 + n:
        return f"its header claims {n} bytes, past the end of the member"
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        return f"its header is not JSON ({type(e).__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ranges = []
    for key, t in header.items():
        if key == "__metadata__":
            continue
        shape, offsets = (t.get("shape"), t.get("data_offsets")) if isinstance(t, dict) else (None, None)
        width = SAFETENSORS_DTYPE_BYTES.get(t.get("dtype")) if isinstance(t, dict) else None
        ok = (width is not None and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
              and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))
        if not ok or offsets[1] - offsets[0] != width * math.prod(shape):
            return f"tensor {key!r} has no valid dtype, shape and byte range"
        ranges.append(offsets)
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            return "its tensors' byte ranges overlap or leave gaps"
        end = stop
    if 8 + n + end != size:
        return f"its tensors end at byte {8 + n + end}, the member has {size}"
    return None


def safetensors_layout(head: bytes) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype as torch names it, shape) from the header of a safetensors member that
    :func:`safetensors_problem` accepted (so the header parses)."""
    n = int.from_bytes(head[:8], "little")
    header = json.loads(head[8:8 + n].decode("utf-8"))
    return {key: (SAFETENSORS_TORCH_DTYPES.get(t["dtype"], t["dtype"]), list(t["shape"]))
            for key, t in header.items() if key != "__metadata__"}
