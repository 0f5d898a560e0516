"""autoseg's default planner with SGD for every configuration: the rules as they were before a small class chose
AdamW (the "before" methods of lesions.toml). A planner file, as a user would write one."""

from __future__ import annotations

from dataclasses import replace

from autoseg.planners.default import plan as default_plan

from autoseg.plan.registry import PlanningContext, register_planner
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Optimizer, Plans


@register_planner("default-sgd")
def plan(fp: Fingerprint, ctx: PlanningContext) -> Plans:
    plans = default_plan(fp, ctx)
    plans.configurations = {k: replace(c, optimizer=Optimizer()) for k, c in plans.configurations.items()}
    plans.notes = [n for n in plans.notes if "optimizer: AdamW" not in n]
    return plans
