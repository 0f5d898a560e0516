"""Label vocabulary shared by every artifact: which values of a dataset.json ``labels`` mapping are
foreground classes, which one is ignored in the loss and the metrics, and, for region datasets, the regions.

Regions (BraTS): a label that maps to a list of values names the union of those values, e.g. whole tumour
``[1, 2, 3]``, tumour core ``[2, 3]``, enhancing tumour ``[3]``. Regions overlap, so a region model has one
sigmoid output per region (no background output) and its label map is painted back from them in
``regions_class_order``: region ``i``'s voxels get value ``order[i]``, later regions over earlier ones
(nnU-Net's semantics). In a region dataset every foreground label is a region, a plain value ``v`` the
region ``[v]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ClassKey = int | tuple[int, ...]  # what is scored: a label value, or a region (the values it unites)


def ignore_label_of(labels: dict) -> int | None:
    """The value of the ``ignore`` label in a dataset.json ``labels`` mapping, if it has one."""
    v = labels.get("ignore")
    return v if isinstance(v, int) else None


def foreground_classes(labels: dict) -> dict[int, str]:
    """Foreground classes (value -> name) of a plain (non-region) label map, without background and ignore."""
    return {v: k for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}


def has_regions(labels: Mapping) -> bool:
    return any(isinstance(v, list) for v in labels.values())


def regions_of(labels: Mapping) -> dict[str, tuple[int, ...]]:
    """The regions (name -> the values it unites, in dataset.json order) of a region dataset; {} otherwise."""
    if not has_regions(labels):
        return {}
    return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in labels.items()
            if k not in ("background", "ignore") and v != 0 and v != []}


def scored_classes(labels: Mapping) -> dict[ClassKey, str]:
    """What training, selection and post-processing score: each foreground value (value -> name, by value), or
    for a region dataset each region (its values as a tuple -> name, in dataset.json order)."""
    regions = regions_of(labels)
    if regions:
        return {values: name for name, values in regions.items()}
    return dict(sorted(foreground_classes(dict(labels)).items()))


def key_values(key: ClassKey) -> tuple[int, ...]:
    """The label values a scored class covers."""
    return key if isinstance(key, tuple) else (key,)


def painted_values(regions: Sequence[Sequence[int]], order: Sequence[int], values: Sequence[int]) -> dict[int, int]:
    """What each label value becomes when its regions are painted in ``order`` (0 when in no region)."""
    out = {}
    for v in values:
        last = [i for i, r in enumerate(regions) if v in r]
        out[v] = order[last[-1]] if last else 0
    return out


def region_problems(labels: Mapping, order: object) -> list[str]:
    """Why a region dataset's regions or ``regions_class_order`` cannot be trained (one message each); [] when fine.

    The regions must be distinct non-empty sets of distinct foreground values, and painting them in ``order``
    must give every foreground value back, so a label map survives labels -> regions -> labels."""
    if not has_regions(labels):
        return []
    regions = regions_of(labels)
    ignore = ignore_label_of(dict(labels))
    problems = []
    for name, values in regions.items():
        if len(set(values)) != len(values):
            problems.append(f"region '{name}' lists a value twice: {list(values)}")
        bad = [v for v in values if v <= 0 or v == ignore]
        if bad:
            problems.append(f"region '{name}' holds {bad[0]}, which is background or ignore; "
                            "a region unites foreground values")
    seen: dict[frozenset, str] = {}
    for name, values in regions.items():
        if frozenset(values) in seen:
            problems.append(f"regions '{seen[frozenset(values)]}' and '{name}' are the same values {sorted(values)}")
        seen.setdefault(frozenset(values), name)
    if problems or not isinstance(order, list) or len(order) != len(regions):
        return problems  # the order's own type and length are checked by the dataset layer
    foreground = sorted({v for r in regions.values() for v in r})
    unknown = [v for v in order if v not in foreground]
    if unknown:
        return [f"'regions_class_order' {order} holds {unknown[0]}, not a value of any region {foreground}"]
    painted = painted_values(list(regions.values()), order, foreground)
    wrong = {v: p for v, p in painted.items() if p != v}
    if wrong:
        v, p = next(iter(wrong.items()))
        return [f"'regions_class_order' {order} does not map regions back to labels: painting the regions in that "
                f"order turns label {v} into {p} (region i's voxels get order[i], later regions over earlier)"]
    return []
