"""S4 (merge): replace each cluster by one filter, summing the consumers' input slices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ...engine import DependencyInfo, GroupPlan, PruningPlan, analyse, apply_plan
from .clustering import group_clusters

# =============================================================================================
# S4: merge
# =============================================================================================

def merge_plan(info: DependencyInfo, clusters: Mapping[Any, Any]) -> PruningPlan:
    """S4 as a :class:`PruningPlan`: per group keep each cluster's lowest member and merge the
    others into it (their consumers' input slices are summed into its slice)."""
    by_group = group_clusters(info, clusters)
    plans = []
    for g in info.groups:
        cl = by_group.get(g.name)
        if cl is None or len(cl) == g.size:
            continue
        plans.append(GroupPlan(g.name, g.size, [c[0] for c in cl], {c[0]: c[1:] for c in cl if len(c) > 1}))
    return PruningPlan(plans, {"method": "csgd"})


def merge(model: nn.Module, example_inputs: torch.Tensor, clusters: Mapping[Any, Any], *,
          info: DependencyInfo | None = None) -> nn.Module:
    """S4: merge every cluster into its lowest-numbered filter and return the smaller model.

    For each cluster ``H(k)`` (``k`` its lowest member) every consumer's input slice becomes
    ``K[:, k] <- sum_{m in H(k)} K[:, m]`` and the other members are deleted from every
    producer, channel-wise layer and consumer; ``k`` keeps its own kernel, bias and BatchNorm
    (running statistics included). Exact when the members are identical (after S3).

    Parameters
    ----------
    model : nn.Module
        Not modified (a pruned copy is returned).
    example_inputs : Tensor
        An input batch for tracing.
    clusters : mapping
        Producing layer (module or name; any producer of a coupled group) or group name ->
        a partition of the group's channels. Groups not named are left as they are.
    info : DependencyInfo, optional
        A ready analysis of ``model`` (skips tracing).

    Returns
    -------
    nn.Module
        The merged, smaller copy.

    Raises
    ------
    ConfigError
        A key that produces no prunable group, clusters that are not a partition, or two
        producers of one coupled group with different clusterings.
    """
    info = info if info is not None else analyse(model, example_inputs)
    return apply_plan(model, example_inputs, merge_plan(info, clusters))


# =============================================================================================
