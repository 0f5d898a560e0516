"""Leaderboard benchmarking: a suite of datasets x methods, each cell end to end, measured and scored alike.

``autoseg benchmark SUITE_FILE -o DIR`` (:func:`run_benchmark`); the suite format is in :mod:`.suite`,
a cell's stages in :mod:`.cells`, the real-data tier in :mod:`.realdata`, the output in :mod:`.leaderboard`.
"""

from autoseg.benchmark.run import run_benchmark
from autoseg.benchmark.suite import Suite, load_suite

__all__ = ["Suite", "load_suite", "run_benchmark"]
