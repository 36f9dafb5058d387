"""Iterative Taylor-FO pruning (Molchanov et al., ICLR 2017).

The steps, repeated ``steps`` times (``docs/sparsity.md``):

T1 score
    every channel ``k`` of layer ``l`` gets the first-order Taylor estimate of the change of the
    loss when its feature map ``z`` is set to zero (the paper's ``Theta_TE``)::

        Theta(z_l^k) = | 1/M * sum_m dC/dz_{l,m}^k * z_{l,m}^k |

    averaged over the calibration batches (criterion ``taylor`` of :mod:`prunekit.criteria`,
    measured on the BatchNorm output of the group, i.e. the map the next layer reads);
T2 normalise
    divide each layer's scores by their L2 norm, so that layers compare (the seed: "the ranking
    of a layer is normalised by its L2 norm; empirically this matters a lot");
T3 remove
    remove the ``N`` lowest channels across the whole network, at least one channel staying in
    every group (:func:`prunekit.methods.oneshot.global_widths`);
T4 fine-tune
    train briefly (``finetune_epochs_per_step``), then go back to T1.

Each iteration emits a :class:`~prunekit.engine.PruningPlan` on the model as it is then; the
plans are chained with :meth:`PruningPlan.then`, so the final plan applied to the original
model gives the final architecture.

References
----------
.. [1] P. Molchanov, S. Tyree, T. Karras, T. Aila, J. Kautz. Pruning convolutional neural
   networks for resource efficient inference. ICLR 2017 (arXiv:1611.06440).
.. [2] J. Gildenblat. Pruning deep neural networks to make them fast and small, 2017
   (a blog post; the source document cites it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..criteria import score
from ..data.batches import is_empty
from ..engine import DependencyInfo, PruningPlan, analyse, apply_plan
from ..engine.budget import check_fraction, count_macs_params, solve_budget
from ..engine.ranking import global_widths, keep_top
from ..errors import DataError, ModelError
from ..train.config import phase_config
from ..utils import module_device
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import register_method


@dataclass
class TaylorOptions(MethodOptions):
    """Options of iterative Taylor-FO pruning (``prunekit.prune(..., method="taylor", ...)``).
    ``lr``, ``batch_size``, ``max_steps_per_epoch`` and ``train_config`` set the fine-tuning
    between iterations, as for :class:`prunekit.methods.slimming.SparsityOptions`."""

    steps: int = option(5, "pruning iterations (T1-T4 each)", min=1)
    calib_images: int = option(512, "training images scored per iteration (T1)", min=1)
    calib_batch_size: int = option(64, "batch size of the scoring passes", min=1)
    finetune_epochs_per_step: int = option(1, "fine-tuning epochs after each iteration but the "
                                           "last (T4); 0 disables it", min=0)
    finetune_last: bool = option(False, "also fine-tune after the last iteration")
    lr: float = option(0.01, "learning rate of the fine-tuning between iterations", min=0)
    batch_size: int = option(128, "batch of the fine-tuning between iterations", min=1)
    max_steps_per_epoch: int | None = option(None, "cap on optimizer steps per epoch (quick runs)",
                                             kind="int", min=1)
    train_config: Any = option(None, "base TrainConfig of the fine-tuning between iterations")


def fit_taylor_budget(budget: int, given: Mapping[str, Any]) -> dict[str, Any]:
    """Options that fit the fine-tuning between iterations into ``budget`` epochs: the
    ``steps - 1`` fine-tunings get ``min(default, budget // (steps - 1))`` epochs each."""
    if "finetune_epochs_per_step" in given:
        return {}
    steps = int(given.get("steps", TaylorOptions.steps))
    if steps <= 1:
        return {}
    per = min(TaylorOptions.finetune_epochs_per_step, int(budget) // (steps - 1))
    return {"finetune_epochs_per_step": per}


def channel_schedule(to_remove: int, steps: int) -> list[int]:
    """Cumulative channels removed after each iteration: equal shares of ``to_remove``."""
    return [int(round(to_remove * k / steps)) for k in range(1, steps + 1)]


def macs_schedule(target: float, steps: int) -> list[float]:
    """MACs fraction to reach after each iteration: geometric, ``target ** (k / steps)``, so
    every iteration removes the same share of what is left."""
    return [float(target) ** (k / steps) for k in range(1, steps + 1)]


def _layer_names(model: nn.Module, layers: Sequence[nn.Module | str]) -> list[str]:
    """Module references of the original model as names (names survive the surgery's copies)."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for layer in layers:
        if isinstance(layer, str):
            out.append(layer)
        elif layer in names:
            out.append(names[layer])
        else:
            raise ModelError("an ignored layer is not a submodule of the model")
    return out


def _total_channels(info: DependencyInfo) -> int:
    return sum(g.size for g in info.groups)


@register_method("taylor", TaylorOptions, fit_budget=fit_taylor_budget, round_to=False,
                 needs_data=True,
                 summary="iterative Taylor-FO pruning with fine-tuning between steps "
                         "(Molchanov et al., ICLR 2017)")
def run(ctx: PruneContext) -> MethodOutput:
    """Iterative Taylor-FO pruning of ``ctx.model`` (T1-T4, ``steps`` times).

    Budget: ``ctx.ratio`` removes ``round(ratio * N)`` of the ``N`` channels of all prunable
    groups of the original model, in equal shares per iteration (the ranking is global, so the
    per-layer fractions differ); ``ctx.target_macs`` lowers the MACs geometrically,
    ``target ** (k / steps)`` after iteration ``k``, each iteration bisecting its number of
    removed channels.

    Returns
    -------
    MethodOutput
        ``plan``: the iterations' plans chained; ``train_epochs``: fine-tuning epochs spent
        inside; ``extra["history"]``: per iteration, channels removed, channels and MACs
        fraction after it.
    """
    opts = ctx.parse(TaylorOptions, "taylor")
    if is_empty(ctx.train_set):
        raise DataError("iterative Taylor pruning needs calibration / training data (data=...)")
    if ctx.target_macs is None:
        check_fraction("ratio", ctx.ratio)
    x = ctx.example_inputs
    ignored = _layer_names(ctx.model, ctx.ignored_layers)
    model = ctx.model
    device = module_device(model)
    info = analyse(model, x, ignored_layers=ignored)
    total0 = _total_channels(info)
    macs0 = count_macs_params(model, x)[0]
    if ctx.target_macs is not None:
        goals: list[float] = macs_schedule(check_fraction("target MACs", ctx.target_macs), opts.steps)
    else:
        goals = [float(c) for c in channel_schedule(int(round(ctx.ratio * total0)), opts.steps)]

    plan = PruningPlan()
    history: list[dict[str, Any]] = []
    epochs = 0.0
    for k, goal in enumerate(goals, start=1):
        if k > 1:
            info = analyse(model, x, ignored_layers=ignored)
        total = _total_channels(info)
        record: dict[str, Any] = {"step": k, "removed": 0}
        scores = score(info, "taylor", ctx.train_set, samples=opts.calib_images,
                       batch_size=opts.calib_batch_size, seed=ctx.seed)
        widths = None
        if ctx.target_macs is None:
            n = int(goal) - (total0 - total)
            if n > 0:
                widths = global_widths(scores, n / total)
        else:
            rel = goal * macs0 / count_macs_params(model, x)[0]
            if rel < 1.0:
                widths = solve_budget(info, rel, lambda r, info=info, scores=scores:
                                      global_widths(scores, r), iters=16)[1]
        step_plan = keep_top(info, scores, widths) if widths is not None else PruningPlan()
        if len(step_plan):
            model = apply_plan(model, x, step_plan)
            plan = plan.then(step_plan)
            record["removed"] = sum(g.size - len(g.keep) for g in step_plan)
        record["channels"] = total - record["removed"]
        record["macs_fraction"] = count_macs_params(model, x)[0] / macs0
        if opts.finetune_epochs_per_step > 0 and (k < opts.steps or opts.finetune_last):
            from ..train import fit

            cfg = phase_config(opts, opts.finetune_epochs_per_step, ctx.seed + k, ctx.options)
            try:
                result = fit(model, ctx.train_set, cfg)
            finally:
                model.to(device)
            epochs += opts.finetune_epochs_per_step
            record["finetune_loss"] = result.history[-1]["loss"] if result.history else None
        history.append(record)

    model.eval()
    extra: dict[str, Any] = {
        "steps": opts.steps, "calib_images": opts.calib_images,
        "finetune_epochs_per_step": opts.finetune_epochs_per_step,
        "removed_channel_fraction": sum(r["removed"] for r in history) / max(total0, 1),
        "reached_macs_fraction": history[-1]["macs_fraction"] if history else 1.0,
        "history": history,
    }
    plan.meta = {"method": "taylor", "ratio": ctx.ratio, "target_macs": ctx.target_macs,
                 "steps": opts.steps}
    model.zero_grad(set_to_none=True)
    return MethodOutput(model, plan, extra, train_epochs=epochs)


__all__ = ["TaylorOptions", "channel_schedule", "macs_schedule", "run"]
