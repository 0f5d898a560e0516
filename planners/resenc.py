"""The default rules with a residual-encoder U-Net (nnU-Net ResEnc: 1, 3, 4, 6, 6, ... blocks per
stage, one decoder conv per stage): more capacity per FLOP in the encoder."""

from __future__ import annotations

from autoseg.planners.default import Settings, plan_with

from autoseg.plan.registry import PlanningContext, register_planner
from autoseg.schema.fingerprint import Fingerprint
from autoseg.schema.plans import Plans

RESENC = Settings(family="resenc_unet", blocks=(1, 3, 4, 6, 6, 6, 6), decoder_convs=1)


@register_planner("resenc")
def plan(fp: Fingerprint, ctx: PlanningContext) -> Plans:
    return plan_with(fp, ctx, RESENC)
