"""A complete method in one file: the worked example of docs/architecture.md.

"Mean-absolute-activation pruning": score each channel by the mean |activation| of its
BatchNorm output over a few calibration images, keep the highest. Registering it is all it
takes for ``prunekit.prune(method="mean-abs")``, ``prunekit prune --method mean-abs``,
``prunekit methods`` and ``compare`` to know it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.data.batches import iter_batches
from prunekit.engine import analyse, apply_plan
from prunekit.engine.budget import budget_widths
from prunekit.engine.ranking import keep_top
from prunekit.methods import MethodOptions, MethodOutput, PruneContext, option, register_method


@dataclass
class MeanAbsOptions(MethodOptions):
    calib_images: int = option(64, "calibration images", min=1)


@register_method("mean-abs", MeanAbsOptions, needs_data=True, summary="mean |activation| (example)")
def run(ctx: PruneContext) -> MethodOutput:
    opts = ctx.parse(MeanAbsOptions, "mean-abs")
    info = analyse(ctx.model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    sums = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in info.groups}
    first = {id(g.producers[0].module): g.name for g in info.groups}

    def record(module, inputs, out) -> None:  # per-channel mean |output| of a producer
        sums[first[id(module)]] += out.detach().abs().double().transpose(0, 1).flatten(1).mean(1)

    hooks = [m.register_forward_hook(record) for m in ctx.model.modules() if id(m) in first]
    with torch.no_grad():
        for x, _ in iter_batches(ctx.train_set, samples=opts.calib_images, batch_size=32):
            ctx.model.eval()(x)
    for h in hooks:
        h.remove()
    _, widths, _ = budget_widths(info, ctx.ratio, ctx.target_macs, round_to=ctx.round_to)
    plan = keep_top(info, sums, widths)
    return MethodOutput(apply_plan(ctx.model, ctx.example_inputs, plan), plan, {"scores": "mean-abs"})
