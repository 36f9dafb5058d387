"""Reconstruction pruning, shared by ThiNet and LASSO channel pruning: the network loop (its
sampling is :mod:`prunekit.methods.sampling`).

For a group of channels (``engine`` terminology: produced by one or more layers, read by one or
more *consumer* convs / linears), both methods answer the same question: which ``keep`` channels,
and which new consumer weights, reproduce the consumers' outputs best? They only differ in the
selection (greedy vs LASSO) and the weights they write (channel scales vs a full least-squares
refit). This module holds what they share:

Sampling (:class:`OriginalTargets`, :func:`sample_group`)
    ``N`` calibration images are streamed batch by batch through the *original* network once
    (forward hooks keep each consumer's original outputs, all channels, at ``p`` drawn output
    positions per image: the reconstruction targets, reused by every group the consumer reads)
    and, for each group, through the network *pruned so far* (a forward pre-hook takes each
    consumer's input at the same positions: for a conv the ``Cin x kh x kw`` window, gathered by
    indexing, no ``unfold`` of whole maps, kept for the group's input columns only). Only these
    samples survive a batch; every forward pass stops at the last hooked layer.
Contributions (:meth:`ConsumerSamples.contributions`)
    ThiNet's ``X [rows, C]``: ``X[i, c] = sum_{k in window} W[o_i, c, k] * x[c, k]``, the share of
    input channel ``c`` in the sampled output value ``i`` (a position paired with a random
    output channel ``o_i``), and ``y[i]``: the original value minus the bias and minus what the
    consumer's *other* input columns (not in this group, e.g. in DenseNet) contribute.
The network loop (:func:`prune_network`)
    Groups in network order; for each: sample from the partially pruned model (inputs) and the
    original (targets) so errors do not accumulate, select, compute the consumers' new weights,
    emit a :class:`~prunekit.engine.GroupPlan` with them and apply it at once (later layers see
    the pruned network). The plans form one :class:`~prunekit.engine.PruningPlan`; replaying it on
    a fresh copy of the model reproduces the result.

Which groups are pruned (see ``docs/reconstruction.md``): residual trunks (groups with several
producers, tied by an add) are left alone unless ``prune_trunk=True`` (the authors pruned only
the blocks' internal channels of ResNet-50); groups with one producer but several consumers
(DenseNet's concatenations) are pruned by stacking every consumer's samples for the selection and
reconstructing each consumer (``stack_consumers=True``, the default; ``False`` skips them).

References
----------
He, Y., Zhang, X. and Sun, J. (2017). Channel pruning for accelerating very deep neural networks.
ICCV, 1389-1397.

Luo, J.-H., Wu, J. and Lin, W. (2017). ThiNet: a filter level pruning method for deep neural
network compression. ICCV, 5058-5066.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..data.batches import count, is_empty
from ..data.batches import select as select_inputs
from ..engine import ChannelGroup, DependencyInfo, GroupPlan, PruningPlan, analyse, apply_group
from ..engine.budget import Widths, budget_widths
from ..errors import DataError, UnsupportedLayerError
from ..utils import module_device, progress
from . import MethodOutput, PruneContext
from .options import MethodOptions, option
from .sampling import (  # noqa: F401 (re-exported)
    ConsumerSamples,
    OriginalTargets,
    conv_patches,
    sample_group,
    stacked_contributions,
)

__all__ = ["ConsumerSamples", "OriginalTargets", "ReconstructOptions", "conv_patches", "eligible_groups",
           "least_squares_weights", "prune_network", "sample_group", "scaled_weights",
           "stacked_contributions"]

Selector = Callable[[torch.Tensor, torch.Tensor, int], list[int]]
#: ``(samples, keep) -> kept channels``: a selection that reads the consumers' samples
Chooser = Callable[[list["ConsumerSamples"], int], list[int]]
#: ``(samples, keep) -> {consumer name: (weights of the kept group columns [out, Kg_kept], bias or None)}``
Reconstructor = Callable[[list["ConsumerSamples"], list[int]],
                         dict[str, tuple[torch.Tensor, torch.Tensor | None]]]


# --------------------------------------------------------------------------------- options
@dataclass
class ReconstructOptions(MethodOptions):
    """Options of both methods (ThiNet, LASSO).

    ``finetune_epochs_between``: fine-tune this many epochs (a fraction means a share of one
    epoch's steps) after each pruned group; the replayed plan then no longer reproduces the
    model (the fine-tuned weights are not in it).
    """

    calib_images: int = option(500, "calibration images streamed per layer (a seeded random "
                               "subset of the training set; a DataLoader's first ones)", min=1)
    samples_per_image: int = option(10, "sampled output values per image (ThiNet: 10)", min=1)
    batch_size: int = option(64, "images per forward pass while sampling", min=1)
    prune_trunk: bool = option(False, "also prune groups with several producers (residual "
                               "trunks), selecting on the stacked samples of their consumers")
    stack_consumers: bool = option(True, "prune single-producer groups read by several "
                                   "consumers (DenseNet) by stacking; false skips them")
    finetune_epochs_between: float = option(0.0, "fine-tuning epochs after each pruned group",
                                            min=0)
    finetune_lr: float = option(0.01, "learning rate of that fine-tuning", min=0)


# --------------------------------------------------------------------------------- weights
def scaled_weights(samples: list[ConsumerSamples], keep: list[int],
                   scale: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """ThiNet's channel scaling (Luo et al., ICCV 2017, optimisation target 2), per consumer.

    Parameters
    ----------
    samples : list of ConsumerSamples
    keep : list of int
        Kept group channels, ascending.
    scale : callable ``(X, y, keep) -> w``
        :func:`prunekit.methods.thinet.scale`.

    Returns
    -------
    dict
        Consumer name -> ``(W[:, kept columns] * w, None)``: each consumer gets its own ``w``
        from its own rows; the bias is unchanged.

    References
    ----------
    Luo, Wu and Lin (2017), ThiNet, ICCV, Section 3.3 ("minimize the reconstruction error").
    """
    out = {}
    for cs in samples:
        X, y = cs.contributions()
        w = scale(X, y, keep)
        where = torch.zeros(cs.group_size, dtype=torch.long)
        where[list(keep)] = torch.arange(len(keep))
        idx = cs.kept_columns(keep)
        factors = w.double().cpu()[where[cs.chan[idx]]]
        W = cs.weight[:, cs.cols[idx]].double() * factors.to(cs.weight.device)
        out[cs.name] = (W.to(cs.weight.dtype), None)
    return out


def least_squares_weights(samples: list[ConsumerSamples], keep: list[int], *, fit_bias: bool | str = "auto",
                          ridge: float = 1e-6) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """He et al.'s second step: refit each consumer on the kept channels by least squares.

    For a conv this is, per output channel, a linear regression from the kept channels' sampled
    input windows ``[S, kept * kh * kw]`` (plus a column of ones for the bias) to the original
    outputs minus the other input columns' share: one ``torch.linalg.lstsq`` with ``out`` right-
    hand sides, in float64. A light ridge (``ridge`` times the mean squared column norm, on the
    weights only) keeps rank-deficient or under-sampled designs well posed; other input columns
    of the consumer (not in the group) keep their weights.

    Parameters
    ----------
    samples : list of ConsumerSamples
    keep : list of int
    fit_bias : bool or "auto"
        Refit the bias too; ``"auto"``: only where the consumer already has one (a conv followed
        by BatchNorm usually has none, and adding one changes the architecture).
    ridge : float
        Relative Tikhonov regularisation.

    Returns
    -------
    dict
        Consumer name -> ``(weights of the kept group columns [out, kept * kh * kw], bias or
        None)``.

    References
    ----------
    He, Zhang and Sun (2017), Channel pruning for accelerating very deep neural networks, ICCV,
    Section 3.1, eq. (4) (the weights are refitted on the kept channels only).
    """
    out = {}
    for cs in samples:
        idx = cs.kept_columns(keep)
        D = cs.U[:, idx.to(cs.U.device)].double()
        T = cs.T.double()
        with_bias = (cs.bias is not None) if fit_bias == "auto" else bool(fit_bias)
        if not with_bias and cs.bias is not None:
            T = T - cs.bias.double()
        k = D.shape[1]
        if k == 0 and not with_bias:  # reads none of the kept channels: nothing to fit
            out[cs.name] = (cs.weight.new_zeros(cs.weight.shape[0], 0), None)
            continue
        if with_bias:
            D = torch.cat([D, torch.ones(D.shape[0], 1, dtype=D.dtype, device=D.device)], 1)
        lam = ridge * float((D[:, :k] ** 2).sum()) / max(k, 1)  # ridge x mean of diag(D^T D)
        if lam > 0:
            reg = torch.zeros(k, D.shape[1], dtype=D.dtype, device=D.device)
            reg[:, :k] = math.sqrt(lam) * torch.eye(k, dtype=D.dtype, device=D.device)
            D = torch.cat([D, reg])
            T = torch.cat([T, torch.zeros(k, T.shape[1], dtype=T.dtype, device=T.device)])
        driver = "gelsy" if D.device.type == "cpu" else None
        B = torch.linalg.lstsq(D, T, driver=driver).solution  # [k(+1), out]
        W = B[:k].T.to(cs.weight.dtype)
        b = B[k].to(cs.weight.dtype) if with_bias else None
        out[cs.name] = (W, b)
    return out


# --------------------------------------------------------------------------------- network
def eligible_groups(info: DependencyInfo, opts: ReconstructOptions) -> tuple[list[str], dict[str, str]]:
    """Group names that the procedure prunes (network order), and the skipped ones with a reason."""
    keep, skipped = [], {}
    for g in info.groups:
        consumers = g.consumers
        if not consumers:
            skipped[g.name] = "no consumer layer to reconstruct"
        elif len(g.producers) > 1 and not opts.prune_trunk:
            skipped[g.name] = "residual trunk (several producers); prune_trunk=False"
        elif len(consumers) > 1 and len(g.producers) <= 1 and not opts.stack_consumers:
            skipped[g.name] = "several consumers; stack_consumers=False"
        elif not all(isinstance(s.module, nn.Linear)
                     or (isinstance(s.module, nn.Conv2d) and s.module.groups == 1) for s in consumers):
            skipped[g.name] = "a consumer is neither a Linear nor an ungrouped Conv2d"
        else:
            keep.append(g.name)
    return keep, skipped


def _budget(ctx: PruneContext, info: DependencyInfo, names: list[str]) -> tuple[Widths, float, float | None]:
    sizes = {g.name: g.size for g in info.groups if g.name in set(names)}

    def widths_fn(r: float) -> Widths:
        return {n: max(1, c - int(round(r * c))) for n, c in sizes.items()}

    ratio, widths, frac = budget_widths(info, ctx.ratio, ctx.target_macs, widths_fn, round_to=ctx.round_to)
    return widths, ratio, frac


def _finetune(model: nn.Module, ctx: PruneContext, epochs: float, lr: float, step: int) -> None:
    from ..train import TrainConfig, epoch_steps, fit

    data = ctx.train_set
    batch = min(128, count(data))
    steps = epoch_steps(data, batch)
    cfg = TrainConfig(epochs=max(1, int(math.ceil(epochs))), batch_size=batch, lr=lr, augment=False,
                      seed=ctx.seed + step, eval_every=0, device=str(module_device(model)),
                      max_steps_per_epoch=max(1, int(round(epochs * steps))) if epochs < 1 else None)
    fit(model, data, cfg)
    model.eval()


def on_contributions(select: Selector) -> Chooser:
    """A selection on ThiNet's ``X, y`` (:func:`stacked_contributions`) as a :data:`Chooser`."""
    def choose(samples: list[ConsumerSamples], keep: int) -> list[int]:
        X, y = stacked_contributions(samples)
        return select(X, y, keep)
    return choose


def prune_network(ctx: PruneContext, method: str, select: Selector | None,
                  reconstruct: Reconstructor, opts: ReconstructOptions | None = None, *,
                  choose: Chooser | None = None, widths: Widths | None = None,
                  groups: list[str] | None = None,
                  targets: OriginalTargets | None = None, refit_all: bool = False) -> MethodOutput:
    """Prune ``ctx.model`` layer by layer, minimising each consumer's reconstruction error.

    For every eligible group in network order (see :func:`eligible_groups`): sample its
    consumers (:func:`sample_group`: inputs from the network pruned so far, targets from the
    original), choose ``keep`` channels with ``select`` on the (stacked) contributions, compute
    the consumers' new weights with ``reconstruct``, and apply the resulting
    :class:`~prunekit.engine.GroupPlan` at once. Budget: ``ctx.ratio`` removes ``round(r * C)``
    channels of each pruned group; ``ctx.target_macs`` searches that ratio with
    :func:`~prunekit.engine.budget.solve_budget` over the pruned groups only.

    ``choose`` replaces ``select`` by a selection that reads the samples themselves (e.g.
    :func:`prunekit.methods.elimination.eliminate`); ``widths`` (with ``groups``, the groups
    they cover) replaces the uniform budget by widths chosen by the caller; ``targets``, the
    original's outputs sampled already (their images are then the calibration images);
    ``refit_all``: also refit the consumers of groups that keep all their channels.

    Returns
    -------
    MethodOutput
        The pruned copy, its plan (replayable with :func:`prunekit.engine.apply_plan` on a fresh
        copy of the model) and ``extra``: the ratio, per-layer relative reconstruction errors
        ``||Y - Y_hat|| / ||Y||`` of the consumers' outputs at the sampled places (``input``:
        before this layer is touched, i.e. drift from earlier layers; ``removed``: after dropping
        the channels; ``reconstructed``: with the new weights), and selection times.
    """
    opts = opts if opts is not None else ctx.parse(ReconstructOptions, method)
    data = ctx.train_set
    if is_empty(data):
        raise DataError(f"{method} needs calibration data (the training set); got none")
    original = ctx.reference()  # the targets come from the unpruned network
    was_training = original.training
    original.eval()
    model = ctx.model.eval()  # consumed: pruned group by group
    info = analyse(model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    names, skipped = eligible_groups(info, opts)
    if not names:
        raise UnsupportedLayerError(f"{method}: no group of this model can be pruned by reconstruction "
                                    f"(skipped: {skipped})")
    if widths is None:
        widths, ratio, frac = _budget(ctx, info, names)
    else:
        names = [n for n in names if n in set(groups or widths)]
        widths = {n: widths.get(n, info.group(n).size) for n in names}
        ratio, frac = None, None
    choose = choose if choose is not None else on_contributions(select)
    if targets is not None:
        images = targets.selection
    else:  # a seeded random subset of an indexable dataset; a DataLoader's first n inputs
        gen = torch.Generator().manual_seed(ctx.seed)
        images = select_inputs(data, opts.calib_images, opts.batch_size, generator=gen)
    n_images = len(images)

    out_rows: dict[str, torch.Tensor] = {}
    plans: list[GroupPlan] = []
    layers: list[dict[str, Any]] = []
    # refit_all: groups kept whole are refit too (their consumers' inputs drifted upstream)
    todo = [n for n in names if widths[n] < info.group(n).size or refit_all]
    t_start = time.perf_counter()
    consumers = [s.name for n in todo for s in info.group(n).consumers]
    t_targets = 0.0
    try:
        if todo and targets is None:
            targets = OriginalTargets(original, consumers, data, images,
                                      samples_per_image=opts.samples_per_image,
                                      batch_size=opts.batch_size, seed=ctx.seed)
            t_targets = time.perf_counter() - t_start
        for step, name in enumerate(progress(todo, desc=f"{method}: layers", total=len(todo))):
            group = info.group(name)
            t0 = time.perf_counter()
            samples = sample_group(model, targets, group, data, images, seed=ctx.seed * 1000003 + step,
                                   out_rows=out_rows)
            t1 = time.perf_counter()
            keep = (list(range(group.size)) if widths[name] >= group.size  # a refit only
                    else sorted(int(k) for k in choose(samples, widths[name])))
            t2 = time.perf_counter()
            if len(keep) != widths[name]:
                raise RuntimeError(f"{method} selected {len(keep)} channels of {name!r}, "
                                   f"expected {widths[name]}")
            new = reconstruct(samples, keep)
            if len(keep) == group.size and (sum(cs.residual_sq(keep, *new[cs.name]) for cs in samples)
                                            >= sum(cs.residual_sq() for cs in samples)):
                # a whole group whose refit does not help (no drift upstream): weights as they are
                new = {cs.name: (cs.weight[:, cs.cols].clone(),
                                 None if cs.bias is None else cs.bias.clone()) for cs in samples}
            rec = {cs.name: cs.weights_after(keep, *new[cs.name]) for cs in samples}
            record = _layer_record(name, group, keep, samples, new, t1 - t0, t2 - t1)
            for slot in group.producers:  # remember which original rows each producer keeps
                rows = sorted(i for c in keep for i in slot.positions[c])
                cur = out_rows.get(slot.name, torch.arange(slot.module.weight.shape[0]))
                out_rows[slot.name] = cur[torch.tensor(rows, dtype=torch.long)]
            gp = GroupPlan(name, group.size, keep, reconstruct=rec)
            apply_group(info, gp)
            plans.append(gp)
            layers.append(record)
            if opts.finetune_epochs_between > 0 and step + 1 < len(todo):
                _finetune(model, ctx, opts.finetune_epochs_between, opts.finetune_lr, step)
    finally:
        original.train(was_training)

    largest = max(layers, key=lambda r: (r["size"], r["select_s"])) if layers else None
    extra: dict[str, Any] = {
        "ratio": ratio, "searched_macs_fraction": frac, "calib_images": n_images,
        "samples_per_image": opts.samples_per_image, "prune_trunk": opts.prune_trunk,
        "pruned_groups": len(plans), "skipped_groups": skipped, "layers": layers,
        "largest_layer": largest["group"] if largest else None,
        "largest_layer_select_s": largest["select_s"] if largest else None,
        "targets_s": t_targets, "total_s": time.perf_counter() - t_start,
    }
    plan = PruningPlan(plans, {"method": method, "ratio": ratio, "searched_macs_fraction": frac,
                               "options": opts.as_dict()})
    return MethodOutput(model, plan, extra,
                        train_epochs=opts.finetune_epochs_between * max(len(todo) - 1, 0))


def _layer_record(name: str, group: ChannelGroup, keep: list[int], samples: list[ConsumerSamples],
                  new: dict[str, tuple[torch.Tensor, torch.Tensor | None]], sample_s: float,
                  select_s: float) -> dict[str, Any]:
    """Relative errors of every consumer (input drift, after removal, after reconstruction)."""
    per: dict[str, dict[str, float]] = {}
    tot = {"input": 0.0, "removed": 0.0, "reconstructed": 0.0}
    y_sq = 0.0
    for cs in samples:
        W, b = new[cs.name]
        r = {"input": cs.residual_sq(), "removed": cs.residual_sq(keep),
             "reconstructed": cs.residual_sq(keep, W, b)}
        per[cs.name] = {k: math.sqrt(v / max(cs.y_sq, 1e-30)) for k, v in r.items()}
        for k in tot:
            tot[k] += r[k]
        y_sq += cs.y_sq
    return {"group": name, "size": group.size, "kept": len(keep), "consumers": per,
            "samples": samples[0].num_samples,
            **{f"err_{k}": math.sqrt(v / max(y_sq, 1e-30)) for k, v in tot.items()},
            "sample_s": sample_s, "select_s": select_s}
