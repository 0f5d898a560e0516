"""The process-tree measurer lives in the package (``autoseg benchmark`` needs it): :mod:`autoseg.benchmark.measure`."""

from autoseg.benchmark.measure import Measurement, machine, measure, process_tree

__all__ = ["Measurement", "machine", "measure", "process_tree"]
