"""Errors a user can act on.

`KdkitError` carries one line that names the field or file, the value, and what was expected. The CLI prints
that line and exits with `exit_code` (2 for bad input), never a traceback. Anything else is a bug: exit 1.
This module imports nothing, so every layer may raise these.
"""

from __future__ import annotations


class KdkitError(Exception):
    """A problem with the user's input or environment that they can fix. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, details: list[str] | None = None):
        self.details = list(details or [])
        super().__init__(message)

    def lines(self) -> list[str]:
        return [str(self)] + [f"  - {d}" for d in self.details]


class ConfigError(KdkitError):
    """The config (YAML, overrides or a section built from it) is invalid. One detail line per problem."""


class DataError(KdkitError):
    """A data file or data set is missing, empty or of the wrong shape."""


class CompatibilityError(KdkitError):
    """Teacher, student and data do not fit together (class counts, shapes, vocabularies)."""


class TrainingError(KdkitError):
    """Training could not go on (a NaN loss, a resume that does not match its run)."""


class TrainingInterrupted(KdkitError):
    """SIGTERM or Ctrl-C during training: a checkpoint was saved at a step boundary. Exit 128 + the signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
