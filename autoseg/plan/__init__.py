"""Planning: the rule toolbox planners use (:mod:`~autoseg.plan.rules`, :mod:`~autoseg.plan.fit`), measured
compute (:mod:`~autoseg.plan.compute`, :mod:`~autoseg.plan.measurements`), the budget, the planner registry
and :func:`~autoseg.plan.make.make_plans`. The Plans data model is :mod:`autoseg.schema.plans`."""
