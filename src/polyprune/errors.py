"""Errors a user can cause. The CLI prints their message on one line and exits with code 2.

Every message names the file or the value at fault. Anything that is not a `PolypruneError` is a bug.
"""

from __future__ import annotations


class PolypruneError(Exception):
    """Base class of user-facing errors (bad input, bad file, bad option, unreachable target)."""

    exit_code = 2


class DataError(PolypruneError):
    """A dataset, image or mask cannot be used."""


class ModelFileError(PolypruneError):
    """A model file is missing, corrupt, unsafe, or does not match its architecture."""


class ConfigError(PolypruneError):
    """An option has a value that cannot work (size not a multiple of 16, unknown name, ...)."""


class TargetError(PolypruneError):
    """A pruning target cannot be met."""


class TrainingError(PolypruneError):
    """Training diverged (NaN or infinite loss) and could not recover."""


class OutputError(PolypruneError):
    """An output file or folder cannot be written (read-only folder, full disk)."""


def one_line(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, cut: errors stay one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
