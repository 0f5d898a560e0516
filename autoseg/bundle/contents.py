"""What a verified bundle archive holds, checked against itself: the plans, post-processing rules, model card
and (configuration -> folds), the manifest's configurations and the weights members held against each other;
and, for ``autoseg verify``, that predict can run it (:mod:`autoseg.bundle.runnable`: sizes, and each fold's
weights against the network its plans build, from the safetensors headers). ``autoseg verify`` streams the
weights instead of loading them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autoseg.bundle.archive import read_archive
from autoseg.bundle.layout import (
    CARD,
    MANIFEST,
    PLANS_MEMBER,
    POSTPROCESSING,
    SAFETENSORS,
    member_kind,
    safetensors_layout,
    weights_member,
    weights_of,
)
from autoseg.errors import UserError
from autoseg.schema.plans import Plans


def verify_bundle(path: Path | str) -> str:
    """Check a bundle fully, as loading does, but streaming its weights (hashed and their safetensors
    layout checked, never held whole), and check that predict can load and run it: a one-line summary, or
    :class:`UserError`. A bundle that verifies is a bundle ``autoseg predict`` can load and run."""
    from autoseg.bundle.runnable import check_runnable

    heads: dict[str, bytes] = {}
    manifest, members = read_archive(path, keep=lambda name: member_kind(name) != SAFETENSORS, heads=heads)
    plans, _, _, folds = bundle_contents(str(path), manifest, members)
    check_runnable(str(path), plans, folds,
                   {(c, k): safetensors_layout(heads[weights_member(c, k)]) for c, ks in folds.items() for k in ks})
    return (f"{path}: OK (format {manifest['format_version']}, {len(manifest['members']) + 1} members, "
            f"checksums match; {plans.dataset_name}, configuration {manifest['configuration']}, "
            f"{sum(len(f) for f in folds.values())} fold(s), weights fit the networks predict builds)")


def bundle_contents(source: str, manifest: dict[str, Any], members: dict[str, bytes]
                    ) -> tuple[Plans, dict[str, list[dict]], str, dict[str, list[int]]]:
    """The plans, post-processing rules, card and (configuration -> folds) of a verified archive, once the
    manifest's configurations and the weights members have been held against each other (and its segment
    codes, if any, against the plans' classes)."""
    from autoseg.postprocess import parse_rules

    try:
        plans = Plans.from_dict(json.loads(members[PLANS_MEMBER]), f"{source}:{PLANS_MEMBER}")
        rules = json.loads(members[POSTPROCESSING])["rules"]
        configs = manifest["configurations"]
        name = manifest["configuration"]
        card = members[CARD].decode()
        folds = {c: [int(k) for k in entry["folds"]] for c, entry in configs.items()}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{source}: incomplete bundle ({type(e).__name__}: {e})") from e
    if name not in configs or any(c not in plans.configurations for c in configs):
        raise UserError(f"{source}: the manifest's configurations ({', '.join(configs)}) are not all in its plans.json")
    for c, ks in folds.items():
        for k in ks:
            if weights_member(c, k) not in manifest["members"]:
                raise UserError(f"{source}: the manifest lists fold {k} of '{c}' but {weights_member(c, k)} is missing")
    for member in manifest["members"]:
        owner = weights_of(member)
        if owner is not None and owner[1] not in folds.get(owner[0], []):
            raise UserError(f"{source}: member {member} is not a fold the manifest's configurations list; "
                            "refusing to load it")
    if manifest.get("segment_codes"):
        from autoseg.schema.segment_codes import check_codes, parse_segment_codes

        where = f"{source}: {MANIFEST} segment_codes"
        check_codes(parse_segment_codes(manifest["segment_codes"], where), list(plans.scored_classes.values()), where)
    post = {key: [dict(r) for r in parse_rules(rules.get(key, []), f"{source}:{POSTPROCESSING}")]
            for key in dict.fromkeys([*configs, *rules])}  # per configuration, and per ensemble ("a+b")
    return plans, post, card, folds
