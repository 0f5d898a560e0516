"""Whether ``autoseg predict`` can load and run a bundle whose archive verified: what the engine relies on,
checked without running it. A bundle that passes is one ``predict`` can load and run; one that does not is
refused by ``autoseg verify`` and by :func:`autoseg.bundle.load_bundle` alike, with one line naming the bundle.

- its plans validate (:mod:`autoseg.schema.plans`, which also bounds the sizes: a patch of 100000^3 voxels
  would fail allocating its first tile), with at least one input channel and two classes;
- ``ct`` normalization carries its statistics (a bundle has no fingerprint to fill them from);
- every fold's weights are the network its plans build: the same tensor names, shapes and dtypes (what
  ``load_state_dict`` needs), compared against the network built on the ``meta`` device, which holds no
  memory however large the plans say it is.
"""

from __future__ import annotations

from collections.abc import Mapping

from autoseg.errors import UserError
from autoseg.schema.plans import Plans

Layout = Mapping[str, tuple[str, list[int]]]  # tensor name -> (dtype as torch names it, shape)


def check_runnable(source: str, plans: Plans, folds: Mapping[str, list[int]],
                   layouts: Mapping[tuple[str, int], Layout]) -> None:
    """Refuse (:class:`UserError`, one line naming ``source``) a bundle predict cannot run: see the module
    docstring. ``folds``: configuration -> its folds; ``layouts``: (configuration, fold) -> its weights'
    tensor names, dtypes and shapes."""
    from autoseg.bundle.layout import weights_member
    from autoseg.nets import layout_mismatch

    where = f"{source}: plans.json"
    if plans.in_channels < 1:
        raise UserError(f"{where}: no input channel (channel_names is empty)")
    if plans.num_classes < (1 if plans.regions else 2):
        raise UserError(f"{where}: {plans.num_classes} output class(es); labels need background and a class")
    for name in folds:
        cfg = plans.configurations[name]
        if any(n.scheme == "ct" and None in (n.clip_low, n.clip_high, n.mean, n.std) for n in cfg.normalization):
            raise UserError(f"{where}: configurations.{name}.normalization: ct normalization without its clip "
                            "bounds and statistics")
    for name, ks in folds.items():
        cfg = plans.configurations[name]
        for k in ks:
            problem = layout_mismatch(cfg.network, plans.in_channels, plans.num_classes, cfg.ndim, layouts[name, k])
            if problem:
                raise UserError(f"{source}: {weights_member(name, k)} does not fit the network its plans.json "
                                f"builds ({problem}); predict could not load it")
