"""One-shot pruning: score channels with a criterion, keep the best ones, cut once.

Local ranking (default) keeps the top ``widths[g]`` channels of each group; global ranking
divides each group's scores by their L2 norm and removes the lowest channels across the network
(at least one channel stays in every group).
"""

from __future__ import annotations

import torch

from ..criteria import Scores, score
from ..engine import DependencyInfo, GroupPlan, PruningPlan, analyse, apply_plan
from ..engine.budget import Widths, budget_widths, widths_at_ratio
from ..errors import ConfigError
from . import MethodOutput, PruneContext


def keep_top(info: DependencyInfo, scores: Scores, widths: Widths) -> PruningPlan:
    """Keep the ``widths[g]`` highest-scoring channels of each group (ties: lower index)."""
    groups = []
    for g in info.groups:
        n = widths.get(g.name, g.size)
        if n >= g.size:
            continue
        order = torch.argsort(-scores[g.name], stable=True)
        groups.append(GroupPlan(g.name, g.size, order[:n].tolist()))
    return PruningPlan(groups)


NORMALIZE = ("l2", "max", "none")


def global_widths(scores: Scores, ratio: float, normalize: str = "l2") -> Widths:
    """Widths after removing the ``round(ratio * N)`` least important of all ``N`` channels,
    ranked network-wide; every group keeps at least one channel (the next channel elsewhere is
    taken instead).

    Parameters
    ----------
    scores : dict[str, Tensor]
        Group name -> per-channel scores.
    ratio : float
        Fraction of all channels to remove.
    normalize : {"l2", "max", "none"}
        Per-group rescaling before the ranking: by the scores' L2 norm (default; Taylor-FO's
        layer normalisation, seed 004), by their maximum, or none (scores that already compare
        across layers, such as BN factors after sparsity training).
    """
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    entries: list[tuple[float, str, int]] = []
    for name, s in scores.items():
        s = s.double()
        if normalize == "l2":
            s = s / s.norm().clamp_min(1e-30)
        elif normalize == "max":
            s = s / s.max().clamp_min(1e-30)
        entries += [(float(v), name, i) for i, v in enumerate(s)]
    entries.sort()
    widths = {name: len(s) for name, s in scores.items()}
    to_remove = int(round(ratio * len(entries)))
    for _, name, _ in entries:
        if to_remove == 0:
            break
        if widths[name] > 1:
            widths[name] -= 1
            to_remove -= 1
    return widths


def plan_for_budget(ctx: PruneContext, info: DependencyInfo, scores: Scores,
                    global_ranking: bool = False) -> tuple[PruningPlan, dict]:
    """Turn scores and the context's budget (ratio or target MACs) into a plan."""
    def widths_fn(r: float) -> Widths:
        return global_widths(scores, r) if global_ranking else widths_at_ratio(info, r)

    ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, widths_fn, round_to=ctx.round_to)
    return keep_top(info, scores, widths), {"ratio": ratio, "searched_macs_fraction": frac}


def run(ctx: PruneContext, criterion: str) -> MethodOutput:
    """Prune ``ctx.model`` in one shot with ``criterion`` (see :mod:`prunekit.criteria`)."""
    info = analyse(ctx.model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    scores = score(info, criterion, ctx.train_set, samples=int(ctx.option("calib_images", 512)),
                   seed=ctx.seed)
    plan, extra = plan_for_budget(ctx, info, scores, bool(ctx.option("global_ranking", False)))
    plan.meta = {"method": criterion, **extra}
    return MethodOutput(apply_plan(ctx.model, ctx.example_inputs, plan), plan, extra)
