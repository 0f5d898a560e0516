"""autoseg's default planner with a region dataset's regions dropped: the label values it unites are trained as
plain exclusive classes (softmax, Dice + CE), the "as plain labels" method of regions.toml. The suite scores its
predictions against dataset.json's regions like every other method's. A planner file, as a user would write one."""

from __future__ import annotations

from dataclasses import replace

from autoseg.planners.default import plan as default_plan

from autoseg.plan.registry import PlanningContext, register_planner
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.labels import ignore_label_of, regions_of
from autoseg.schema.plans import Plans


@register_planner("default-labels")
def plan(fp: Fingerprint, ctx: PlanningContext) -> Plans:
    regions = regions_of(fp.labels)
    if not regions:
        return default_plan(fp, ctx)
    names = {c.value: c.name for c in fp.classes}
    values = sorted({v for r in regions.values() for v in r})
    labels: dict = {"background": 0, **{names.get(v, f"label_{v}"): v for v in values}}
    if ignore_label_of(fp.labels) is not None:
        labels["ignore"] = ignore_label_of(fp.labels)
    plans = default_plan(replace(fp, labels=labels, regions_class_order=[]), ctx)
    plans.notes.append(f"labels: the regions {', '.join(regions)} trained as the plain label values {values}")
    return plans
