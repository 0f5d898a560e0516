"""The planner registry: a planner is a function ``(fingerprint, context) -> Plans`` registered with
``@register_planner(name)`` (the built-in ones in :mod:`autoseg.planners`; a user's file registers its own, or
defines a function named ``plan``). :func:`autoseg.plan.make.get_planner` looks them up by name or file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from autoseg.device import DeviceInfo
from autoseg.plan.measurements import Store
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans


@dataclass
class PlanningContext:
    """What a planner is told besides the fingerprint: the device, the wall-clock budget, and the store of this
    machine's step measurements (:func:`autoseg.plan.fit.fit` takes it)."""

    device: DeviceInfo
    budget_s: float
    folds: int = 5
    planner_name: str = "default"
    measurements: Store | None = None


Planner = Callable[[Fingerprint, PlanningContext], Plans]
PLANNERS: dict[str, Planner] = {}


def register_planner(name: str) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        PLANNERS[name] = fn
        return fn
    return deco
