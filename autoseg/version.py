"""The version of autoseg, recorded in every artifact it writes (the bottom of the import graph)."""

__version__ = "0.1.0"
