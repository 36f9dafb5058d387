"""The peer: Torch-Pruning's own pruner (``tp.pruner.MetaPruner``) with its own importance
criteria, run in-process on the same model, data and budget as ours (``--method tp:l1`` ...).

This is the reference prunekit must beat; it is deliberately Torch-Pruning's code path end to
end (its grouping, its importance, its group reduction and normalisation), not ours.

Widths: with a plain ``ratio`` / ``target_macs`` the peer uses Torch-Pruning's own uniform ratio
(bisected for a MACs target). With ``round_to`` the peer is given exactly the rounded widths our
budget gives every other method (one per-group ratio each, via ``pruning_ratio_dict``), so that
rounded comparisons are at identical shapes; Torch-Pruning still chooses which channels go.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torch_pruning as tp

from ..data.batches import is_empty, iter_batches, labels_of
from ..engine import analyse, find_classifier
from ..engine.budget import Widths, budget_widths, check_fraction, count_macs_params
from ..errors import ConfigError, DataError
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .registry import MethodSpec, register

#: Torch-Pruning's criteria run as peers (``tp:<criterion>``)
PEER_CRITERIA = ("l1", "l2", "taylor", "bn-scale", "random")


@dataclass
class PeerOptions(MethodOptions):
    """Options of the Torch-Pruning peer."""

    calib_images: int = option(512, "images whose gradients tp:taylor accumulates", min=1)
    global_ranking: bool = option(False, "Torch-Pruning's global pruning", cli="--global")


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
    """Sum the cross-entropy gradients of the first ``samples`` labelled inputs of ``data``
    (any source :func:`prunekit.data.batches.iter_batches` reads)."""
    if is_empty(data):
        raise DataError("tp:taylor needs calibration data")
    model.zero_grad(set_to_none=True)
    model.eval()
    for x, y in iter_batches(data, samples, batch_size):
        F.cross_entropy(model(x), labels_of(y, "tp:taylor")).backward()


def _layer_ratios(info, widths: Widths) -> dict[str, float]:
    """Per-layer ratios (by module name) that make Torch-Pruning keep exactly ``widths[g]``
    channels of each group: it keeps ``int(C * (1 - ratio))``, so ``ratio = 1 - (w + 0.5) / C``;
    every producer of the group carries the ratio, whichever of them Torch-Pruning takes as the
    group's root."""
    return {slot.name: max(0.0, 1.0 - (widths.get(g.name, g.size) + 0.5) / g.size)
            for g in info.groups for slot in g.producers}


def _prune_copy(ctx: PruneContext, opts: PeerOptions, criterion: str, ratio: float,
                layer_ratios: dict[str, float] | None = None):
    model = copy.deepcopy(ctx.model)
    torch.manual_seed(ctx.seed)
    if criterion == "taylor":
        _accumulate_gradients(model, ctx.train_set, opts.calib_images)
    named = dict(model.named_modules())
    ignored = [named[n] if isinstance(n, str) else n for n in ctx.ignored_layers]
    clf = find_classifier(model)
    ratio_dict = {named[n]: r for n, r in layer_ratios.items()} if layer_ratios is not None else None
    pruner = tp.pruner.MetaPruner(
        model, ctx.example_inputs, importance=_importance(criterion), pruning_ratio=ratio,
        pruning_ratio_dict=ratio_dict, ignored_layers=ignored + ([clf] if clf is not None else []),
        global_pruning=opts.global_ranking)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def run(ctx: PruneContext, criterion: str) -> MethodOutput:
    """Prune a copy of ``ctx.model`` with Torch-Pruning's MetaPruner and ``criterion``."""
    _importance(criterion)  # validate early
    opts = ctx.parse(PeerOptions, f"tp:{criterion}")
    if ctx.round_to is not None:
        if opts.global_ranking:
            raise ConfigError("round_to gives the peer fixed per-group widths; it cannot be "
                              "combined with global ranking")
        info = analyse(ctx.model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
        ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, round_to=ctx.round_to)
        model = _prune_copy(ctx, opts, criterion, 0.0, _layer_ratios(info, widths))
        got = {g.name: g.size for g in analyse(model, ctx.example_inputs).groups}
        if sorted(got.values()) != sorted(widths.values()):
            raise ConfigError(f"Torch-Pruning did not reproduce the rounded widths {widths} (got {got})")
        return MethodOutput(model, None, {"ratio": ratio, "searched_macs_fraction": frac,
                                          "widths": widths})
    if ctx.target_macs is None:
        ratio = check_fraction("ratio", ctx.ratio)
        return MethodOutput(_prune_copy(ctx, opts, criterion, ratio), None, {"ratio": ratio})
    target = check_fraction("target MACs", ctx.target_macs)
    base = count_macs_params(ctx.model, ctx.example_inputs)[0]
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = _prune_copy(ctx, opts, criterion, mid)
        frac = count_macs_params(model, ctx.example_inputs)[0] / base
        if frac <= target:
            hi, best = mid, (model, mid, frac)
        else:
            lo = mid
    if best is None:
        raise ConfigError(f"Torch-Pruning cannot reach {target:.3f} of the MACs on this model")
    model, ratio, frac = best
    return MethodOutput(model, None, {"ratio": ratio, "searched_macs_fraction": frac})


for _criterion in PEER_CRITERIA:
    register(MethodSpec(f"tp:{_criterion}", partial(run, criterion=_criterion), PeerOptions,
                        summary=f"the peer: Torch-Pruning's MetaPruner with its {_criterion} importance",
                        needs_data=_criterion == "taylor", requires=(("torch_pruning", "torch-pruning"),)))
