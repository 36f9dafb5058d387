"""Pruning methods. Each method module registers itself (:mod:`prunekit.methods.registry`) with
its name, its options dataclass (:mod:`prunekit.methods.options`) and the facts the rest of
prunekit reads; ``get(name)`` returns its entry point ``run(ctx: PruneContext) -> MethodOutput``.

The contract between :func:`prunekit.prune` and a method:

* ``ctx.model`` is the method's to consume: it may train it in place, cut it, or return a new
  module; the caller has already copied the user's model.
* ``ctx.original`` is the unpruned network, read-only: the teacher of a distillation, the
  target of a reconstruction. It is never trained or cut (a method that calls a trainer with it
  as teacher relies on the trainer only reading it).
* The method returns a :class:`MethodOutput`: the smaller plain model, its plan, its own report
  fields (``extra``), the figures it can draw from what it computed (``figures``), and the
  epochs it trained by itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn as nn

from ..engine import PruningPlan
from ..errors import ConfigError
from .options import MethodOptions, option
from .registry import MethodSpec, available, register, register_method, spec, specs

O = TypeVar("O", bound=MethodOptions)

#: what ``prunekit demo`` compares by default: a criterion, the peer, the flagship, a
#: reconstruction method
DEMO_METHODS = ("l1", "tp:l1", "csgd", "thinet")
#: ``prunekit.prune``'s method when none is named: data-free and fast
DEFAULT_METHOD = "l1"

__all__ = ["DEFAULT_METHOD", "DEMO_METHODS", "MethodOptions", "MethodOutput", "MethodSpec",
           "PruneContext", "available", "get", "check_round_to_supported", "option", "register",
           "register_method", "spec", "specs"]


@dataclass
class PruneContext:
    """Everything a method may use (see the module docstring for who owns what).

    At most one of ``ratio`` / ``target_macs`` is set; neither only for a method that chooses
    its widths itself (:attr:`MethodSpec.chooses_widths`).
    """

    model: nn.Module
    example_inputs: torch.Tensor
    ratio: float | None = None
    target_macs: float | None = None
    train_set: Any = None          # training / calibration data, optional
    test_set: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    ignored_layers: list[nn.Module | str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    round_to: int | None = None    # kept widths rounded down to multiples of this (engine.budget)
    #: the unpruned network, read-only (``None``: ``model`` is it, unchanged so far)
    original: nn.Module | None = None

    def parse(self, options: type[O], method: str) -> O:
        """``self.options`` checked as ``method``'s options dataclass."""
        return options.from_options(self.options, method)

    def reference(self) -> nn.Module:
        """The unpruned network, read-only: ``original``, or (when the caller gave none) a
        copy of ``model`` taken now, before the method changes it, and kept as ``original``."""
        if self.original is None:
            self.original = copy.deepcopy(self.model).eval()
        return self.original


@dataclass
class MethodOutput:
    model: nn.Module
    plan: PruningPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: epochs of training the method itself spent (counted in a comparison's budget)
    train_epochs: float = 0.0
    #: data for the report's figures, by figure kind (e.g. ``"dendrogram"``, ``"bn_factors"``)
    figures: dict[str, Any] = field(default_factory=dict)


def get(name: str):
    """The entry point ``run(ctx) -> MethodOutput`` of method ``name`` (see :func:`spec`)."""
    return spec(name).run


def check_round_to_supported(method: str, round_to: int | None) -> None:
    """:class:`ConfigError` when ``round_to`` is given to a method whose widths come from
    thresholds or step-by-step removal."""
    if round_to is not None and not spec(method).round_to:
        ok = ", ".join(n for n, s in specs().items() if s.round_to)
        raise ConfigError(f"round_to (--round-to) is not supported by {method!r} (its widths come "
                          f"from thresholds or step-by-step removal); supported by: {ok}")
