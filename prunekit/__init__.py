"""prunekit: make trained CNNs physically smaller and faster by removing whole filters."""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    PrunekitError,
    PrunekitWarning,
    TrainingError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ModelError", "PrunekitError",
    "PrunekitWarning", "TrainingError", "UnsupportedLayerError", "__version__",
    "prune", "profile", "save", "load",
]


def __getattr__(name: str):  # lazy: keep `import prunekit` light
    if name == "prune":
        from .api import prune
        return prune
    if name == "profile":
        from .measure import profile
        return profile
    if name in ("save", "load"):
        from . import io as _io
        return getattr(_io, name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
