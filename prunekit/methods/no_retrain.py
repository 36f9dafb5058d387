"""``reconstruct``: pruning without retraining, from unlabeled calibration images only.

For a trained model and a few hundred images (their labels are never read), the recipe is:

1. **Targets.** Stream the calibration images through the original network once and keep every
   consumer layer's outputs at sampled positions (:class:`~prunekit.methods.sampling.OriginalTargets`).
2. **Damage curves.** For every prunable group (residual trunks included), sample its consumers'
   inputs in the original network and run backward elimination
   (:func:`~prunekit.methods.elimination.eliminate`): the consumers' relative refit error at
   every width, in one pass.
3. **Layer-adaptive widths.** Spend the MACs budget where a channel costs the least error
   (:func:`~prunekit.engine.allocate.allocate_widths`); ``widths="uniform"`` keeps the uniform
   ratio instead.
4. **Select and refit, layer after layer.** In network order, with inputs from the network
   pruned so far and targets from the original (errors do not accumulate): choose the kept
   channels (``selection``: backward elimination, LASSO, ThiNet's greedy, or C-SGD's survey and
   clustering with one channel kept per cluster) and refit every consumer's weights by least
   squares (He et al., 2017), :func:`~prunekit.methods.reconstruct.prune_network`.
5. **BatchNorm statistics** re-estimated on the calibration images, on request
   (``recalibrate_bn``; off by default: the refit layers reproduce the original's pre-BatchNorm
   outputs, so the original statistics fit them better than statistics re-estimated from 1,000
   images, as measured on ResNet-20).
6. **Optional distillation** (``distill_steps``): Adam steps matching the original's logits on
   the calibration images (:func:`~prunekit.train.distill.distill_on_inputs`), reported apart.

References
----------
He, Y., Zhang, X. and Sun, J. (2017). Channel pruning for accelerating very deep neural networks.
ICCV, 1389-1397.

Luo, J.-H., Wu, J. and Lin, W. (2017). ThiNet. ICCV, 5058-5066.

Ding, X., Ding, G., Guo, Y. and Han, J. (2019). Centripetal SGD for pruning very deep
convolutional networks with complicated structure. CVPR, 4943-4953 (S1 survey, S2 clustering).

Couvreur, C. and Bresler, Y. (2000). On the optimality of the backward greedy algorithm for the
subset selection problem. SIAM J. Matrix Anal. Appl. 21(3), 797-808.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..data.batches import is_empty
from ..data.batches import select as select_inputs
from ..engine import analyse
from ..engine.allocate import allocate_widths
from ..engine.budget import budget_widths, check_fraction, keeps_shape, macs_of_widths, widths_at_ratio
from ..errors import ConfigError, DataError, UnsupportedLayerError
from ..utils import progress
from . import MethodOutput, PruneContext
from .elimination import eliminate
from .options import MethodOptions, option
from .reconstruct import (
    ConsumerSamples,
    ReconstructOptions,
    eligible_groups,
    least_squares_weights,
    on_contributions,
    prune_network,
)
from .registry import register_method
from .sampling import OriginalTargets, sample_group

__all__ = ["NoRetrainOptions", "cluster_selection", "run"]

SELECTIONS = ("eliminate", "lasso", "thinet", "clusters")


@dataclass
class NoRetrainOptions(MethodOptions):
    """Options of ``reconstruct``."""

    calib_images: int = option(1000, "unlabeled calibration images (a seeded random subset of the "
                               "data; a DataLoader's first ones); labels are never read", min=1)
    samples_per_image: int = option(10, "sampled output values per image and layer", min=1)
    batch_size: int = option(64, "images per forward pass while sampling", min=1)
    prune_trunk: bool = option(True, "also prune residual trunks (groups with several producers)")
    stack_consumers: bool = option(True, "prune single-producer groups read by several consumers "
                                   "(DenseNet) by stacking; false skips them")
    selection: str = option("eliminate", "which channels a group keeps: backward elimination on the "
                            "refit error, LASSO, ThiNet's greedy, or C-SGD clusters (one channel "
                            "per cluster)", choices=SELECTIONS)
    widths: str = option("adaptive", "per-group widths: the budget spent where a channel costs the "
                         "least refit error, or the same ratio everywhere", choices=("adaptive", "uniform"))
    damage: str = option("output", "what a group's damage curve measures: the consumers' refit "
                         "error scaled by the change of the network's output when the group alone "
                         "is pruned (probe images), or the refit error alone",
                         choices=("output", "refit"))
    curve_images: int = option(250, "calibration images the damage curves are sampled on (the "
                               "first of them; the selection and refit use all)", min=1)
    probe_images: int = option(128, "calibration images the output damage is measured on", min=1)
    probe_widths: tuple = option((0.25, 0.5, 0.75), "fractions of a group's channels at which its "
                                 "output damage is measured (each in (0, 1))", kind="any")
    refit_all: bool = option(True, "also refit the consumers of groups that keep every channel "
                             "(their inputs drifted with the layers pruned before them)")
    recalibrate_bn: bool = option(False, "re-estimate BatchNorm statistics on the calibration images "
                                  "(off by default: after the least-squares refit every layer "
                                  "already reproduces the original's pre-BatchNorm outputs, whose "
                                  "statistics the original's BatchNorm holds; measured in "
                                  "bench/results/no_retrain.md)")
    ridge: float = option(1e-6, "relative ridge of the least-squares refits", min=0)
    distill_steps: int = option(0, "Adam steps matching the original's logits on the calibration "
                                "images after pruning (0: none, pure no-gradient result)", min=0)
    distill_lr: float = option(1e-3, "learning rate of that distillation", above=0)
    distill_temperature: float = option(2.0, "softmax temperature of that distillation", above=0)


# ------------------------------------------------------------------------------ selections
def cluster_selection(samples: list[ConsumerSamples], keep: int, *, seed: int = 0) -> list[int]:
    """C-SGD's S1 and S2 without S3: cluster the group's channels by their responses and keep, in
    each of the ``keep`` clusters, the member most correlated with the cluster (its medoid).

    S1 (survey): a channel's vector is its input windows at every sampled place of every consumer
    (standardised). S2: :func:`prunekit.methods.csgd.clustering.cluster` (agglomerative on
    Pearson correlation) into ``keep`` clusters. The least-squares refit that follows replaces S3's
    centripetal training and S4's merge: with one channel left per cluster, the consumers'
    weights that best reproduce the original outputs are refit directly.
    """
    from .csgd.clustering import cluster

    C = samples[0].group_size
    blocks = []
    for cs in samples:
        U = cs.U.double().cpu()
        per = [torch.nonzero(cs.chan == c).flatten() for c in range(C)]
        width = max(len(p) for p in per)
        v = torch.zeros(C, U.shape[0] * width, dtype=torch.float64)
        for c, p in enumerate(per):
            if len(p):
                v[c, :U.shape[0] * len(p)] = U[:, p].reshape(-1)
        blocks.append(v)
    vec = torch.cat(blocks, 1)
    clusters = cluster(vec, keep, "agglomerative", seed=seed)
    z = (vec - vec.mean(1, keepdim=True)) / vec.std(1, keepdim=True).clamp_min(1e-12)
    kept = []
    for members in clusters:
        if len(members) == 1:
            kept.append(members[0])
            continue
        zc = z[members]
        corr = zc @ zc.mean(0)
        kept.append(members[int(torch.argmax(corr))])
    return sorted(kept)


def _chooser(opts: NoRetrainOptions, seed: int):
    if opts.selection == "eliminate":
        return lambda samples, k: eliminate(samples, ridge=opts.ridge).keep(k)
    if opts.selection == "clusters":
        return lambda samples, k: cluster_selection(samples, k, seed=seed)
    if opts.selection == "lasso":
        from .lasso import select_channels as lasso_select
        return on_contributions(lambda X, y, k: lasso_select(X, y, k, seed=seed))
    from .thinet import select_channels as thinet_select
    return on_contributions(thinet_select)


# ------------------------------------------------------------------------------ the recipe
def damage_curves(ctx: PruneContext, targets: OriginalTargets, info, names: list[str],
                  opts: NoRetrainOptions, probe: torch.Tensor | None,
                  probes: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[str, torch.Tensor]:
    """Step 2: every group's damage at every width.

    The consumers' relative refit error ``e_g(k)`` of backward elimination (sampled in the
    original network) gives the shape of each curve; with ``probe`` images
    (``damage="output"``), its scale is measured where it matters: the group alone is pruned to
    a few widths (``probes``: fractions of its channels, kept set and refit of the path) and the
    relative squared change of the network's OUTPUT on the probe images is recorded; the curve
    is ``s_g(k) e_g(k)`` with ``s_g`` interpolated between those probes. Layers whose errors
    the rest of the network amplifies then cost more than layers it absorbs.
    """
    ref = None
    if probe is not None:
        with torch.no_grad():
            ref = ctx.reference()(probe)
        ref_sq = float((ref.double() ** 2).sum())
    curves = {}
    for step, n in enumerate(progress(names, desc="reconstruct: damage curves", total=len(names))):
        samples = sample_group(ctx.model, targets, info.group(n), None, None, seed=ctx.seed * 7919 + step)
        path = eliminate(samples, ridge=opts.ridge)
        curve = path.errors.clone()
        C = info.group(n).size
        if ref is not None:
            ks, scales = [], []
            for f in probes:
                k = min(C - 1, max(1, int(round(f * C))))
                if k in ks or C < 2:
                    continue
                keep = path.keep(k)
                new = least_squares_weights(samples, keep, ridge=opts.ridge)
                with _refit_in_place(ctx.model, samples, keep, new), torch.no_grad():
                    out = float(((ctx.model(probe) - ref).double() ** 2).sum()) / max(ref_sq, 1e-30)
                ks.append(k)
                scales.append(out / max(float(curve[k]), 1e-12))
            if ks:
                order = sorted(range(len(ks)), key=lambda i: ks[i])
                kx = torch.tensor([ks[i] for i in order], dtype=torch.float64)
                sx = torch.tensor([scales[i] for i in order], dtype=torch.float64)
                grid = torch.arange(C + 1, dtype=torch.float64)
                s_k = _interp(grid, kx, sx)
                curve = curve * s_k
        curves[n] = curve
        del samples
    return curves


@contextmanager
def _refit_in_place(model: torch.nn.Module, samples: list[ConsumerSamples], keep: list[int],
                    new: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> Iterator[None]:
    """The group pruned to ``keep`` without surgery: every consumer reads the removed channels
    with zero weights and the kept ones with their refit weights (the network computes exactly
    what the pruned one would); the weights are restored on exit."""
    mods = dict(model.named_modules())
    saved = {}
    for cs in samples:
        m = mods[cs.name]
        saved[cs.name] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
        W = torch.zeros_like(cs.weight)
        other = torch.ones(W.shape[1], dtype=torch.bool)
        other[cs.cols] = False
        W[:, other] = cs.weight[:, other]
        Wk, b = new[cs.name]
        W[:, cs.cols[cs.kept_columns(keep)]] = Wk.to(W.dtype)
        with torch.no_grad():
            m.weight.copy_(W.reshape(m.weight.shape))
            if b is not None and m.bias is not None:
                m.bias.copy_(b)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, (w, b) in saved.items():
                mods[name].weight.copy_(w)
                if b is not None:
                    mods[name].bias.copy_(b)


def _first_images(images, n: int) -> torch.Tensor:
    """The first ``n`` inputs of a selection, as one batch (only those are held)."""
    out, have = [], 0
    for x, _ in images:
        out.append(x[:n - have])
        have += len(out[-1])
        if have >= n:
            break
    return torch.cat(out)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation, constant beyond the end points (``numpy.interp``)."""
    if len(xp) == 1:
        return torch.full_like(x, float(fp[0]))
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def _adaptive_knob(info, curves: dict[str, torch.Tensor], round_to: int | None):
    """``r -> widths``: the damage-optimal allocation (:func:`allocate_widths`) at a MACs budget
    of ``1 - r`` (the narrowest widths where that is out of reach), non-increasing in ``r``:
    the knob :func:`~prunekit.measure.latency_table.solve_latency_budget` searches to meet a
    measured latency. Cached per knob value."""
    full = {g.name: g.size for g in info.groups}
    cache: dict[float, dict[str, int]] = {}

    def fn(r: float) -> dict[str, int]:
        key = round(float(r), 4)
        if key not in cache:
            try:
                widths, _ = allocate_widths(info, curves, max(1.0 - key, 1e-3), round_to=round_to)
            except ConfigError:  # below the narrowest widths' MACs
                widths = {n: 1 for n in curves}
            cache[key] = {**full, **widths}
        return cache[key]

    return keeps_shape(fn)


def _target_fraction(ctx: PruneContext, info, names: list[str]) -> float:
    """The MACs fraction to meet: ``target_macs``, or what a uniform ``ratio`` would keep."""
    if ctx.target_macs is not None:
        return check_fraction("target MACs", ctx.target_macs)
    ratio = check_fraction("ratio", ctx.ratio)
    full = {g.name: g.size for g in info.groups}
    uniform = {**full, **{n: w for n, w in widths_at_ratio(info, ratio).items() if n in set(names)}}
    return macs_of_widths(info, uniform) / macs_of_widths(info, full)


@register_method("reconstruct", NoRetrainOptions, needs_data=True,
                 summary="no retraining, no labels: layer-adaptive widths, channel selection and "
                         "least-squares refit against the original's outputs, BatchNorm "
                         "re-estimation (He et al. 2017 / Luo et al. 2017 reconstruction)")
def run(ctx: PruneContext) -> MethodOutput:
    """Prune ``ctx.model`` from unlabeled calibration images (see the module docstring)."""
    opts = ctx.parse(NoRetrainOptions, "reconstruct")
    raw = opts.probe_widths
    try:
        probes = tuple(float(f) for f in (raw.split(",") if isinstance(raw, str)
                                          else raw if isinstance(raw, (list, tuple)) else [raw]))
    except (TypeError, ValueError):
        probes = ()
    if not probes or not all(0 < f < 1 for f in probes):
        raise ConfigError(f"probe_widths must be fractions in (0, 1), got {opts.probe_widths!r}")
    data = ctx.train_set
    if is_empty(data):
        raise DataError("reconstruct needs calibration images (--data / data=); got none")
    t0 = time.perf_counter()
    original = ctx.reference().eval()
    model = ctx.model.eval()
    info = analyse(model, ctx.example_inputs, ignored_layers=ctx.ignored_layers)
    names, skipped = eligible_groups(info, ReconstructOptions(prune_trunk=opts.prune_trunk,
                                                              stack_consumers=opts.stack_consumers))
    if not names:
        raise UnsupportedLayerError(f"reconstruct: no group of this model can be pruned by "
                                    f"reconstruction (skipped: {skipped})")
    sizes = {n: info.group(n).size for n in names}
    gen = torch.Generator().manual_seed(ctx.seed)
    images = select_inputs(data, opts.calib_images, opts.batch_size, generator=gen)
    consumers = [s.name for n in names for s in info.group(n).consumers]
    targets = OriginalTargets(original, consumers, data, images, samples_per_image=opts.samples_per_image,
                              batch_size=opts.batch_size, seed=ctx.seed)
    t_targets = time.perf_counter() - t0
    curves: dict[str, torch.Tensor] = {}
    from ..engine.budget import LatencyTarget

    latency = isinstance(ctx.target_macs, LatencyTarget)  # --target-latency: the latency search
    if opts.widths == "adaptive":
        probe = None
        if opts.damage == "output":
            probe = _first_images(images, opts.probe_images).to(next(model.parameters()).device)
        few = select_inputs(data, min(opts.curve_images, opts.calib_images), opts.batch_size,
                            generator=torch.Generator().manual_seed(ctx.seed + 1))
        curve_targets = OriginalTargets(original, consumers, data, few,
                                        samples_per_image=opts.samples_per_image,
                                        batch_size=opts.batch_size, seed=ctx.seed + 1)
        curves = damage_curves(ctx, curve_targets, info, names, opts, probe, probes)
        del curve_targets
        if latency:
            # the measured-latency search moves one knob: here the MACs budget of the
            # damage-optimal allocation, so the widths keep their layer-adaptive shape
            _, widths, frac = budget_widths(info, None, ctx.target_macs,
                                            _adaptive_knob(info, curves, ctx.round_to),
                                            round_to=ctx.round_to)
        else:
            widths, frac = allocate_widths(info, curves, _target_fraction(ctx, info, names),
                                           round_to=ctx.round_to)
    else:
        _, widths, frac = budget_widths(
            info, ctx.ratio, ctx.target_macs,
            lambda r: {**{g.name: g.size for g in info.groups},
                       **{n: max(1, c - int(round(r * c))) for n, c in sizes.items()}},
            round_to=ctx.round_to)
    t_widths = time.perf_counter() - t0 - t_targets
    shared = ReconstructOptions(calib_images=opts.calib_images, samples_per_image=opts.samples_per_image,
                                batch_size=opts.batch_size, prune_trunk=opts.prune_trunk,
                                stack_consumers=opts.stack_consumers)
    out = prune_network(ctx, "reconstruct", None, lambda s, k: least_squares_weights(s, k, ridge=opts.ridge),
                        shared, choose=_chooser(opts, ctx.seed), widths=widths, groups=names,
                        targets=targets, refit_all=opts.refit_all)
    pruned = out.model
    bn_images = 0
    if opts.recalibrate_bn:
        from ..train.bn import recalibrate_bn
        bn_images = recalibrate_bn(pruned, images, samples=len(images), batch_size=opts.batch_size)
    extra: dict[str, Any] = dict(out.extra)
    extra.update({"selection": opts.selection, "widths_mode": opts.widths,
                  "widths": {n: [sizes[n], widths[n]] for n in names},
                  "widths_source": (f"{opts.widths}, measured-latency search" if latency else opts.widths),
                  "macs_fraction_planned": frac, "bn_images": bn_images,
                  "damage": {n: float(curves[n][widths[n]]) for n in curves},
                  "targets_s": t_targets, "widths_s": t_widths,
                  "no_gradient_s": time.perf_counter() - t0, "labels_read": False})
    if opts.distill_steps > 0:
        from ..train.distill import distill_on_inputs
        x = _first_images(images, len(images))
        extra["distill"] = distill_on_inputs(pruned, original, x, opts.distill_steps, lr=opts.distill_lr,
                                             batch_size=opts.batch_size,
                                             temperature=opts.distill_temperature, seed=ctx.seed)
    extra["total_s"] = time.perf_counter() - t0
    # the plan replays the selection and the refit; BatchNorm statistics and distilled weights
    # are not in it
    extra["plan_reproduces_model"] = bn_images == 0 and opts.distill_steps == 0
    return MethodOutput(pruned.eval(), out.plan, extra)
