"""Built-in planners. Each is one small module of rules producing Plans from a Fingerprint."""

from planners import default, resenc  # noqa: F401  (registers them)
