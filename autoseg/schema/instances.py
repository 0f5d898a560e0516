"""The instance extension of the nnU-Net v2 layout: which classes' objects are instances, and where their ids lie.

``instancesTr/CASE.<ending>`` beside ``labelsTr/CASE.<ending>`` (same grid; 0 no instance, 1..N one object
each, ids unique within a case) and the ``dataset.json`` key ``"instance_classes"``: names from ``labels`` whose
objects are instances. Every voxel of an instance carries one label, an instance class; every instance-class
voxel carries an id. Without ``instancesTr/`` the instances are the connected components of each instance
class (full connectivity). Everything that ignores the key and the folder reads the dataset unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

INSTANCE_CLASSES_KEY = "instance_classes"
INSTANCE_FOLDERS = {"Tr": "instancesTr", "Ts": "instancesTs"}


def instance_class_problems(labels: Mapping, names: object) -> list[str]:
    """Why a ``dataset.json`` ``instance_classes`` value is unusable, one message per problem (empty: fine)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return [f"'{INSTANCE_CLASSES_KEY}' must be a list of class names from 'labels'"]
    problems = []
    for name in names:
        if name not in labels:
            known = ", ".join(k for k in labels if k not in ("background", "ignore"))
            problems.append(f"'{INSTANCE_CLASSES_KEY}' names '{name}', which is not a class in 'labels' "
                            f"(classes: {known})")
        elif name in ("background", "ignore") or not isinstance(labels[name], int) or labels[name] == 0:
            problems.append(f"'{INSTANCE_CLASSES_KEY}' names '{name}', which is not a single foreground label "
                            "value (background, ignore and regions cannot be instance classes)")
    if len(set(names)) != len(names):
        problems.append(f"'{INSTANCE_CLASSES_KEY}' names a class twice")
    return problems


def instance_classes(raw: Mapping) -> dict[int, str]:
    """Label value -> name of the instance classes a parsed ``dataset.json`` declares (empty without the key).

    Unusable entries are skipped here; :func:`instance_class_problems` is what reports them.
    """
    labels, names = raw.get("labels"), raw.get(INSTANCE_CLASSES_KEY)
    if not isinstance(labels, Mapping) or not isinstance(names, list):
        return {}
    return {labels[n]: n for n in names if isinstance(n, str) and isinstance(labels.get(n), int)
            and not isinstance(labels.get(n), bool) and labels[n] != 0 and n not in ("background", "ignore")}
