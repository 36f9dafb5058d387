"""The shared pruning engine: dependency groups, plans and surgery (see ``docs/engine.md``)."""

from .graph import (
    ChannelGroup,
    DependencyInfo,
    ParamSlot,
    Refusal,
    Slot,
    analyse,
    find_classifier,
    input_columns,
    is_depthwise,
    is_grouped,
    layer_names,
    refusal_error,
    refusals_before_copy,
    resolve_layers,
)
from .plan import GroupPlan, PlanError, PruningPlan
from .surgery import apply_group, apply_plan, fold_consumers, leftover_hooks, make_identical

__all__ = [
    "ChannelGroup", "DependencyInfo", "GroupPlan", "ParamSlot", "PlanError", "PruningPlan",
    "Refusal", "Slot", "analyse", "apply_group", "apply_plan", "find_classifier",
    "fold_consumers", "input_columns", "is_depthwise", "is_grouped", "layer_names",
    "leftover_hooks", "make_identical", "refusal_error", "refusals_before_copy",
    "resolve_layers",
]
