"""User-facing errors.

Bad input is expected, not exceptional: every such failure is a :class:`UserError` whose message is one
line naming the file and the problem. The CLI prints it without a traceback and exits with code 2.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (a file, an argument, a dataset) rather than with autoseg."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (a file, a case or the dataset) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class DatasetError(UserError):
    """A dataset has one or more problems; all of them are listed, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self):  # survive pickling across worker processes with the problems intact
        return (DatasetError, (self.problems,))


def display(path: Path | str) -> str:
    return str(path)
