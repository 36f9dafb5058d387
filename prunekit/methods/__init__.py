"""Pruning methods. Each produces a smaller model (and, where it has one, a ``PruningPlan``)
through the shared engine. ``get(name)`` returns the method's entry point
``run(ctx: PruneContext) -> MethodOutput``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..criteria import CRITERIA
from ..engine import PruningPlan
from ..errors import ConfigError


@dataclass
class PruneContext:
    """Everything a method may use. Exactly one of ``ratio`` / ``target_macs`` is set."""

    model: nn.Module
    example_inputs: torch.Tensor
    ratio: float | None = None
    target_macs: float | None = None
    train_set: Any = None          # ImageDataset (calibration / training), optional
    test_set: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    ignored_layers: list[nn.Module | str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    round_to: int | None = None    # kept widths rounded down to multiples of this (engine.budget)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


@dataclass
class MethodOutput:
    model: nn.Module
    plan: PruningPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: epochs of training the method itself spent (counted in a comparison's budget)
    train_epochs: float = 0.0


_MODULES = {
    "csgd": "csgd", "thinet": "thinet", "lasso": "lasso", "slimming": "slimming",
    "mrts": "slimming", "taylor": "taylor", "autopruner": "autopruner", "curl": "curl",
}
PEER_CRITERIA = ("l1", "l2", "taylor", "bn-scale", "random")
#: methods whose widths come from thresholds or from step-by-step removal: ``round_to`` would
#: change what they mean, so they refuse it
NO_ROUND_TO = ("slimming", "mrts", "taylor", "curl")


def check_round_to_supported(method: str, round_to: int | None) -> None:
    """:class:`ConfigError` when ``round_to`` is given to a method in :data:`NO_ROUND_TO`."""
    if round_to is not None and method in NO_ROUND_TO:
        raise ConfigError(f"round_to (--round-to) is not supported by {method!r} (its widths come "
                          f"from thresholds or step-by-step removal); supported by the criteria, "
                          f"the tp:* peers, csgd, thinet, lasso and autopruner")


def available() -> list[str]:
    """Method names accepted by ``prunekit.prune`` (those implemented in this build)."""
    names = [c for c in CRITERIA if c != "taylor"]
    for name, mod in _MODULES.items():
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError:
            continue
        names.append(name)
    names += [f"tp:{c}" for c in PEER_CRITERIA]
    return names


def get(name: str) -> Callable[[PruneContext], MethodOutput]:
    """The entry point of method ``name`` (a criterion name means one-shot pruning with it)."""
    if name.startswith("tp:"):
        from . import peer
        return lambda ctx: peer.run(ctx, name[3:])
    if name in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except ModuleNotFoundError:
            module = None
        if module is not None:
            return getattr(module, f"run_{name}", None) or module.run
    if name in CRITERIA:
        from . import oneshot
        return lambda ctx: oneshot.run(ctx, name)
    raise ConfigError(f"unknown method {name!r}; choose from {', '.join(available())}")
