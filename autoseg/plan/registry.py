"""Planners by name, or from a user's file: ``autoseg plan --planner default|resenc|path/to/mine.py``.

A planner is a function ``(fingerprint, context) -> Plans`` registered with ``@register_planner(name)``.
A user's file registers its own, or defines a function named ``plan``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoseg.device import DeviceInfo
from autoseg.errors import UserError
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans


@dataclass
class PlanningContext:
    """What a planner is told besides the fingerprint: the device and the wall-clock budget."""

    device: DeviceInfo
    budget_s: float
    folds: int = 5
    planner_name: str = "default"


Planner = Callable[[Fingerprint, PlanningContext], Plans]
PLANNERS: dict[str, Planner] = {}


def register_planner(name: str) -> Callable[[Planner], Planner]:
    def deco(fn: Planner) -> Planner:
        PLANNERS[name] = fn
        return fn
    return deco


def get_planner(name_or_path: str) -> Planner:
    """A registered planner by name, or the planner a Python file defines."""
    importlib.import_module("planners")  # registers the built-in planners
    if name_or_path in PLANNERS:
        return PLANNERS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"{path}: planner file not found")
        before = dict(PLANNERS)
        spec = importlib.util.spec_from_file_location(f"autoseg_user_planner_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: report it as their file's problem
            raise UserError(f"{path}: the planner file failed to load ({type(e).__name__}: {e})") from e
        # by identity, not name: loading the same file again re-registers its names with new functions
        new = [n for n, fn in PLANNERS.items() if before.get(n) is not fn]
        if new:
            return PLANNERS[new[0]]
        if callable(getattr(module, "plan", None)):
            return module.plan
        raise UserError(f"{path}: defines no planner (decorate a function with @register_planner or name it `plan`)")
    raise UserError(f"unknown planner '{name_or_path}' (known: {', '.join(sorted(PLANNERS))}, or a path to a .py file)")
