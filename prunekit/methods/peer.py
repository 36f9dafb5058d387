"""The peer: Torch-Pruning's own pruner (``tp.pruner.MetaPruner``) with its own importance
criteria, run in-process on the same model, data and budget as ours (``--method tp:l1`` ...).

This is the reference prunekit must beat; it is deliberately Torch-Pruning's code path end to
end (its grouping, its importance, its group reduction and normalisation), not ours.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch_pruning as tp

from ..engine import find_classifier
from ..engine.budget import check_fraction, count_macs_params
from ..errors import ConfigError, DataError
from . import MethodOutput, PruneContext


def _importance(criterion: str):
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    if criterion == "bn-scale":
        return tp.importance.BNScaleImportance()
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"unknown Torch-Pruning criterion {criterion!r}; "
                      "choose from l1, l2, taylor, bn-scale, random")


def _accumulate_gradients(model, data, samples: int, batch_size: int = 64) -> None:
    if data is None or len(data) == 0:
        raise DataError("tp:taylor needs calibration data")
    model.zero_grad(set_to_none=True)
    model.eval()
    n = min(samples, len(data))
    for start in range(0, n, batch_size):
        x, y = data.batch(torch.arange(start, min(start + batch_size, n)))
        F.cross_entropy(model(x), y).backward()


def _prune_copy(ctx: PruneContext, criterion: str, ratio: float):
    model = copy.deepcopy(ctx.model)
    torch.manual_seed(ctx.seed)
    if criterion == "taylor":
        _accumulate_gradients(model, ctx.train_set, int(ctx.option("calib_images", 512)))
    named = dict(model.named_modules())
    ignored = [named[n] if isinstance(n, str) else n for n in ctx.ignored_layers]
    clf = find_classifier(model)
    pruner = tp.pruner.MetaPruner(
        model, ctx.example_inputs, importance=_importance(criterion), pruning_ratio=ratio,
        ignored_layers=ignored + ([clf] if clf is not None else []),
        global_pruning=bool(ctx.option("global_ranking", False)))
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def run(ctx: PruneContext, criterion: str) -> MethodOutput:
    """Prune a copy of ``ctx.model`` with Torch-Pruning's MetaPruner and ``criterion``."""
    _importance(criterion)  # validate early
    if ctx.target_macs is None:
        ratio = check_fraction("ratio", ctx.ratio)
        return MethodOutput(_prune_copy(ctx, criterion, ratio), None, {"ratio": ratio})
    target = check_fraction("target MACs", ctx.target_macs)
    base = count_macs_params(ctx.model, ctx.example_inputs)[0]
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = _prune_copy(ctx, criterion, mid)
        frac = count_macs_params(model, ctx.example_inputs)[0] / base
        if frac <= target:
            hi, best = mid, (model, mid, frac)
        else:
            lo = mid
    if best is None:
        raise ConfigError(f"Torch-Pruning cannot reach {target:.3f} of the MACs on this model")
    model, ratio, frac = best
    return MethodOutput(model, None, {"ratio": ratio, "searched_macs_fraction": frac})
