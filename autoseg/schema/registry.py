"""Name -> builder registries for the components plans.json names (networks, losses, normalizations).

The names a plans file may use are part of its schema (:mod:`autoseg.schema.plans`): the built-in names are
listed there, so a plan is checked on load without importing torch, and the builders register under those
names where they live (``@NETWORKS.register("unet")`` in :mod:`autoseg.nets`). Registering a new name (a
user's loss, say) adds it to the schema's set, so plans naming it load in that process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """The builders of one kind of component, by the names the schema allows for it."""

    def __init__(self, kind: str, names: set[str]):
        self.kind, self.names = kind, names  # the schema's set of allowed names, shared
        self._builders: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            self._builders[name] = fn
            self.names.add(name)
            return fn

        return add

    def __delitem__(self, name: str) -> None:
        del self._builders[name]
        self.names.discard(name)

    def __getitem__(self, name: str) -> F:
        try:
            return self._builders[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._builders))})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self):
        return iter(self._builders)
