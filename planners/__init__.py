"""Built-in planners (installed as ``autoseg.planners``). Each is one small module of rules producing Plans
from a Fingerprint; a user's planner is a file like these, passed as ``autoseg plan --planner FILE.py``."""

from autoseg.planners import default, resenc  # noqa: F401  (registers them)
