"""The shared pruning engine: dependency groups, plans and surgery (see ``docs/engine.md``)."""

from .graph import ChannelGroup, DependencyInfo, Slot, analyse, find_classifier, is_depthwise
from .plan import GroupPlan, PlanError, PruningPlan
from .surgery import apply_group, apply_plan, fold_consumers, leftover_hooks, make_identical

__all__ = [
    "ChannelGroup", "DependencyInfo", "GroupPlan", "PlanError", "PruningPlan", "Slot",
    "analyse", "apply_group", "apply_plan", "find_classifier", "fold_consumers",
    "is_depthwise", "leftover_hooks", "make_identical",
]
