"""Typed exceptions. Every user mistake raises a subclass of :class:`PrunekitError`;
the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """An option has a bad value (ratio outside (0, 1), unknown method, ...)."""


class DataError(PrunekitError):
    """A dataset is missing, unreadable or empty."""


class ModelError(PrunekitError):
    """Unknown model name, or a model the engine cannot handle."""


class UnsupportedLayerError(ModelError):
    """A layer the pruning engine cannot prune correctly. The message names the layer."""


class CheckpointError(PrunekitError):
    """A checkpoint is missing, truncated, corrupt or carries code."""


class TrainingError(PrunekitError):
    """Training diverged (NaN/Inf in loss or weights) or cannot continue."""


class PrunekitWarning(RuntimeWarning):
    """Something the user should know about a result that is still returned (too few
    calibration samples, a schedule too short to converge ...). The CLI prints each as one
    ``prunekit: warning: ...`` line on stderr."""
