"""``autoseg plan --search``: an Optuna study around the rules' configuration, inside the user's budget. A stage
above training (each trial trains and is scored by the inference engine), so it has its own package:
:mod:`~autoseg.search.run` (the study as the CLI runs it), :mod:`~autoseg.search.trial` (one trial),
:mod:`~autoseg.search.space` (what is searched), :mod:`~autoseg.search.study` (storage and the trial loop),
:mod:`~autoseg.search.report` (the table and plots it leaves)."""

from autoseg.search.run import (
    SearchBudget,
    SearchResult,
    divide_budget,
    plan_with_search,
    run_search,
    search_summary,
    search_worker,
)

__all__ = ["SearchBudget", "SearchResult", "divide_budget", "plan_with_search", "run_search", "search_summary",
           "search_worker"]
