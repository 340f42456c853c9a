"""The errors a person can act on, in one place that imports nothing heavy.

The command line catches these and prints their message (no traceback); every message says what was wrong,
what was expected and how to fix it. Keeping them here, free of torch, lets `aflora --help` start fast.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "FederationError", "ModelError", "OutputError", "RoundAborted"]


class ConfigError(ValueError):
    """A configuration value that is missing, malformed or out of range."""


class DataError(ValueError):
    """A data problem the user can fix (missing file, wrong format, unknown name...)."""


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded."""


class FederationError(RuntimeError):
    """Something in bringing the federation up, running on it or stopping it went wrong; the message says what."""


class RoundAborted(RuntimeError):
    """Too few usable replies to aggregate a round; the run stops with its last checkpoint intact."""


class OutputError(ValueError):
    """An output folder that cannot be written without losing what it holds; the message names the way out."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or altered; the message names the intact one to continue from, if any."""
