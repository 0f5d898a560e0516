"""Label vocabulary shared by every artifact: which values of a dataset.json ``labels`` mapping are
foreground classes and which one is ignored in the loss and the metrics."""

from __future__ import annotations


def ignore_label_of(labels: dict) -> int | None:
    """The value of the ``ignore`` label in a dataset.json ``labels`` mapping, if it has one."""
    v = labels.get("ignore")
    return v if isinstance(v, int) else None


def foreground_classes(labels: dict) -> dict[int, str]:
    """Foreground classes (value -> name) of a plain (non-region) label map, without background and ignore."""
    return {v: k for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}
