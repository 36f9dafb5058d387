"""One-shot pruning: score channels with a criterion, keep the best ones, cut once.

Local ranking (default) keeps the top ``widths[g]`` channels of each group; global ranking
divides each group's scores by their L2 norm and removes the lowest channels across the network
(at least one channel stays in every group).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..criteria import CRITERIA, Scores, needs_data, score
from ..engine import DependencyInfo, PruningPlan, analyse, apply_plan
from ..engine.budget import Widths, budget_widths, keeps_shape, widths_at_ratio
from ..engine.ranking import NORMALIZE, global_widths, keep_top  # noqa: F401 (re-exported)
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import MethodSpec, register


def plan_for_budget(ctx: PruneContext, info: DependencyInfo, scores: Scores,
                    global_ranking: bool = False) -> tuple[PruningPlan, dict]:
    """Turn scores and the context's budget (ratio or target MACs) into a plan."""
    def widths_fn(r: float) -> Widths:
        return global_widths(scores, r) if global_ranking else widths_at_ratio(info, r)
    if global_ranking:
        keeps_shape(widths_fn)

    ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, widths_fn, round_to=ctx.round_to)
    return keep_top(info, scores, widths), {"ratio": ratio, "searched_macs_fraction": frac}


@dataclass
class OneShotOptions(MethodOptions):
    """Options of one-shot pruning with a criterion."""

    calib_images: int = option(512, "calibration images scored (data criteria)", min=1)
    global_ranking: bool = option(False, "rank channels across layers instead of per layer",
                                  cli="--global")


def run(ctx: PruneContext, criterion: str) -> MethodOutput:
    """Prune ``ctx.model`` in one shot with ``criterion`` (see :mod:`prunekit.criteria`)."""
    opts = ctx.parse(OneShotOptions, criterion)
    info = analyse(ctx.model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    scores = score(info, criterion, ctx.train_set, samples=opts.calib_images, seed=ctx.seed)
    plan, extra = plan_for_budget(ctx, info, scores, opts.global_ranking)
    plan.meta = {"method": criterion, **extra}
    return MethodOutput(apply_plan(ctx.model, ctx.example_inputs, plan), plan, extra)


# Every criterion is a one-shot method under its own name, except ``taylor``: that name is the
# iterative method (prunekit.methods.taylor), whose ``steps=1`` is one-shot Taylor-FO.
for _criterion in CRITERIA:
    if _criterion != "taylor":
        register(MethodSpec(_criterion, partial(run, criterion=_criterion), OneShotOptions,
                            summary=f"one-shot pruning by the {_criterion} criterion",
                            needs_data=needs_data(_criterion), vanishes=True))
