"""Exceptions raised for bad input and failed runs.

Every error a user can cause by what they type (a config key, a data directory) derives from
:class:`CSparseError`; the CLI turns those into a one-line message and exit code 2.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CSparseError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NetworkError",
    "OptionError",
    "TrainingDiverged",
    "TrainingInterrupted",
]


class CSparseError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigError(CSparseError, ValueError):
    """A configuration key or value is invalid. The message names the key and the value."""


class OptionError(ConfigError):
    """A method's option is invalid: ``key`` is relative to where the method is declared
    (the config prefixes it, e.g. ``sparsity.structure``)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class DataError(CSparseError, ValueError):
    """A dataset could not be found, downloaded, verified or parsed."""


class CheckpointError(CSparseError, ValueError):
    """A checkpoint or saved model cannot be used (another format version, not such a file)."""


class NetworkError(CSparseError, TypeError):
    """A network cannot be traced or transformed as asked (its units, folding its BatchNorms):
    the message names the module or the reason."""


class TrainingDiverged(CSparseError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingInterrupted(CSparseError):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
