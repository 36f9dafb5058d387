"""Network slimming and MRTS: sparsity training of the BatchNorm scale factors, then thresholds.

Both methods share three steps (``docs/sparsity.md``):

S1 sparsity training
    train the network with ``loss + lambda * R(gamma)`` over every BatchNorm scale factor
    ``gamma`` that belongs to a prunable group (eq. 1-3 of [3]_). The penalty enters as a
    subgradient added to ``gamma.grad`` after ``backward`` (:class:`ScaleRegulariser`, plugged
    into :func:`prunekit.train.fit` as ``Hooks.grad_transform``).

    * slimming [1]_: ``R(gamma) = ||gamma||_1`` (eq. 2);
    * MRTS [3]_: the mutual regulariser of eq. 4, ``tau * ||gamma||_1 - sum_i I(gamma_i; z_i)``,
      implemented as the polarisation regulariser of [2]_,
      ``R(gamma) = tau * ||gamma||_1 - ||gamma - mean(gamma)||_1``, with the mean taken over
      each layer (default) or over the whole network (as in [2]_), and the factors kept in
      ``[0, eps]`` (eq. 4 and 6) by a clamp after every optimizer step.

S2 channel factors
    a group of coupled channels (a residual stage, a DenseNet concatenation) is judged as one:
    the factor of channel ``c`` is the mean of ``|gamma|`` over the group's BatchNorm layers
    (the rule of :mod:`prunekit.criteria`, criterion ``bn-scale``). Groups with no BatchNorm
    have no factor and are never pruned by these methods.

S3 thresholds
    * slimming: ONE global threshold on the raw factors removes the requested fraction of
      channels network-wide (:func:`global_threshold_widths`); no group is ever emptied;
    * MRTS: a threshold per layer (eq. 11, :func:`layer_thresholds`): sort the layer's factors
      ascending and cut below the first factor at which the cut factors' share of the
      layer's total factor mass reaches ``delta``.

Fine-tuning after the cut is :func:`prunekit.prune`'s ``finetune_epochs``.

References
----------
.. [1] Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan, C. Zhang. Learning efficient convolutional
   networks through network slimming. ICCV 2017.
.. [2] T. Zhuang, Z. Zhang, Y. Huang, X. Zeng, K. Shuang, X. Li. Neuron-level structured
   pruning using polarization regularizer. NeurIPS 2020.
.. [3] 陈震, 杨娟. 利用互信息的自适应阈值通道剪枝方法 (MRTS: mutual regularisation and
   threshold selection). 智能计算机与应用, 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..criteria import Scores
from ..engine.budget import Widths, check_fraction, count_macs_params, macs_of_widths, solve_budget
from ..errors import ConfigError
from . import MethodOutput, PruneContext
from .registry import register_method
from .sparsity import (  # noqa: F401 (re-exported: the shared steps)
    AUTO_MAX,
    AUTO_PUSH,
    LAMBDA_CHAIN,
    LAMBDA_COUPLED,
    ScaleRegulariser,
    SparsityOptions,
    _finish,
    _sparsity_phase,
    auto_sparsity,
    bn_slots,
    global_threshold_widths,
    group_factors,
    has_coupling,
    liu_sparsity,
    make_regulariser,
    polarization,
    removed_fraction,
    resolve_sparsity,
    separation,
    sparsity_train,
)

_DELTA_MAX = 0.999  # bisection range of delta for budgets (delta -> 1 keeps one channel per layer)


# ------------------------------------------------------------------------------ thresholds
def layer_thresholds(gammas: Sequence[torch.Tensor], delta: float = 1e-3) -> list[float]:
    """MRTS layer-adaptive thresholds ([3]_, eq. 11).

    For each layer, sort ``|gamma|`` ascending and return the first factor ``gamma_t`` at which
    the cumulative sum reaches ``delta`` of the layer's total::

        sum_{gamma in N} |gamma|  <  delta * sum_{all} |gamma|  <=  sum_{gamma in N} |gamma| + gamma_t

    where ``N`` are the factors before ``gamma_t``: the channels with ``|gamma| < gamma_t`` are
    pruned, those at or above it kept. Eq. 7-10 of the paper only bound the exponentials of
    these sums; since ``exp`` is increasing, eq. 11 is this comparison of the sums themselves.
    Because ``gamma_t`` itself is kept, a layer is never cut to zero channels; a bimodal layer
    whose small mode holds less than ``delta`` of the mass is cut exactly at the gap, and a
    layer whose factors are all comparable loses nothing (its smallest factor alone exceeds
    ``delta`` of the total for any sensible ``delta``).

    Parameters
    ----------
    gammas : sequence of Tensor
        One vector of scale factors per layer (signs are ignored).
    delta : float
        Share of the layer's factor mass that may be cut, in ``[0, 1)`` (paper: 0.001).

    Returns
    -------
    list of float
        The threshold of each layer (prune ``|gamma| < threshold``).

    Examples
    --------
    >>> layer_thresholds([torch.tensor([0.0, 0.0005, 0.5, 0.75]),   # cut at the gap
    ...                   torch.tensor([0.25, 0.5, 0.75])])          # nothing to cut
    [0.5, 0.25]
    """
    if not 0.0 <= float(delta) < 1.0:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")
    out = []
    for i, g in enumerate(gammas):
        a = torch.as_tensor(g).detach().abs().double().flatten().cpu()
        if a.numel() == 0:
            raise ConfigError(f"layer {i} has no scale factors")
        if not bool(torch.isfinite(a).all()):
            raise ConfigError(f"layer {i} has non-finite scale factors")
        s = torch.sort(a).values
        cum = torch.cumsum(s, 0)
        limit = float(delta) * float(cum[-1])
        t = int(torch.searchsorted(cum, torch.tensor([limit], dtype=torch.float64))[0])
        out.append(float(s[min(t, len(s) - 1)]))
    return out


def threshold_widths(scores: Scores, delta: float) -> Widths:
    """Channels kept per group by the MRTS thresholds at ``delta`` (always at least one)."""
    names = list(scores)
    thr = layer_thresholds([scores[n] for n in names], delta)
    return {n: max(1, int((scores[n].abs() >= t).sum())) for n, t in zip(names, thr, strict=True)}


@register_method("slimming", SparsityOptions, own_training=("sparsity_epochs", 0), round_to=False,
                 chooses_widths=True, needs_data=True,
                 summary="network slimming: L1 sparsity training of the BN factors, one global "
                         "threshold (Liu et al., ICCV 2017)")
def run_slimming(ctx: PruneContext) -> MethodOutput:
    """Network slimming [1]_: L1 sparsity training, one global threshold, cut.

    ``ctx.ratio`` removes that fraction of all channels of the BatchNorm groups network-wide
    (one threshold on the raw factors, at least one channel per group); ``ctx.target_macs``
    bisects that fraction until the model keeps at most the target share of the MACs; with
    neither, the ``threshold`` option is the threshold.
    """
    info, opts, extra, epochs = _sparsity_phase(ctx, "l1")
    scores = group_factors(info)
    if ctx.ratio is None and ctx.target_macs is None:
        if opts.threshold is None:
            raise ConfigError("slimming without a budget needs the threshold option (or give "
                              "ratio / target_macs)")
        widths = {n: max(1, int((s >= opts.threshold).sum())) for n, s in scores.items()}
        ratio = removed_fraction(scores, widths)
    elif ctx.target_macs is not None:
        ratio, widths, _ = solve_budget(info, ctx.target_macs,
                                        lambda r: global_threshold_widths(scores, r), iters=20)
    else:
        ratio = check_fraction("ratio", ctx.ratio)
        widths = global_threshold_widths(scores, ratio)
    cut = [float(v) for n, s in scores.items() for v in torch.sort(s).values[: len(s) - widths[n]]]
    if ctx.ratio is None and ctx.target_macs is None:
        extra.update(ratio=ratio, threshold=opts.threshold)
        return _finish(ctx, info, scores, widths, opts, extra, epochs, "slimming")
    extra.update(ratio=ratio, threshold=max(cut) if cut else None)
    return _finish(ctx, info, scores, widths, opts, extra, epochs, "slimming")


def _smallest(ok: Callable[[float], bool], iters: int = 40) -> float | None:
    """Smallest ``r`` in [0, 1] with ``ok(r)`` (``ok`` monotone); ``None`` if ``ok(1)`` fails."""
    if ok(0.0):
        return 0.0
    if not ok(1.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


@register_method("mrts", SparsityOptions, own_training=("sparsity_epochs", 0), round_to=False,
                 chooses_widths=True, needs_data=True,
                 summary="MRTS: polarising sparsity training, layer-adaptive thresholds (eq. 11)")
def run_mrts(ctx: PruneContext) -> MethodOutput:
    """MRTS [3]_: polarising sparsity training, layer-adaptive thresholds (eq. 11), cut.

    Without a budget the cut is at the thresholds for ``delta`` (the paper's method). Budget
    handling (reported in ``extra``):

    * ``delta_used`` is the smallest ``delta`` whose thresholds meet the budget (``ratio``:
      that fraction of the channels removed network-wide; ``target_macs``: at most that share of
      the MACs kept); with ``adaptive=True`` the paper's ``delta`` is kept whenever it already
      prunes enough;
    * ``natural_macs_fraction`` / ``natural_removed_fraction``: what the paper's thresholds at
      ``delta`` alone give;
    * ``delta_needed``: the ``delta`` the thresholds need for the budget. When it exceeds
      ``max_delta`` (the cut would go into the non-zero mode, i.e. the sparsity training did not
      make enough factors vanish), ``budget_met_by_thresholds`` is ``False``, ``delta_used`` is
      ``None`` and the widths come from one global ranking of the polarised factors instead
      (``fallback = "global-ranking"``), so the budget is still met;
    * ``reached_macs_fraction`` and ``removed_channel_fraction``: what the cut reached.
    """
    info, opts, extra, epochs = _sparsity_phase(ctx, "polarization")
    scores = group_factors(info)
    base = count_macs_params(ctx.model, ctx.example_inputs)[0]
    natural = threshold_widths(scores, opts.delta)
    extra.update(delta=opts.delta, max_delta=opts.max_delta, adaptive=opts.adaptive,
                 natural_removed_fraction=removed_fraction(scores, natural),
                 natural_macs_fraction=macs_of_widths(info, natural) / base)
    lo = opts.delta if opts.adaptive else 0.0
    hi = max(_DELTA_MAX, lo)

    def delta_of(r: float) -> float:
        return lo + r * (hi - lo)

    delta_needed: float | None       # None: no delta reaches the budget (flat layers, ties)
    if ctx.ratio is None and ctx.target_macs is None:   # the paper: thresholds at delta
        extra.update(delta_needed=opts.delta, delta_used=opts.delta, budget_met_by_thresholds=True,
                     fallback=None, thresholds=dict(zip(scores, layer_thresholds(
                         list(scores.values()), opts.delta), strict=True)))
        return _finish(ctx, info, scores, natural, opts, extra, epochs, "mrts")
    if ctx.target_macs is not None:
        target = check_fraction("target MACs", ctx.target_macs)
        extra["target_macs"] = target
        if opts.adaptive and extra["natural_macs_fraction"] <= target:
            delta_needed, widths = opts.delta, natural
        elif macs_of_widths(info, threshold_widths(scores, hi)) / base > target:
            delta_needed, widths = None, natural
        else:
            r, widths, _ = solve_budget(info, target, lambda r: threshold_widths(scores, delta_of(r)),
                                        iters=16)
            delta_needed = delta_of(r)
    else:
        ratio = check_fraction("ratio", ctx.ratio)
        extra["ratio"] = ratio
        r = _smallest(lambda r: removed_fraction(scores, threshold_widths(scores, delta_of(r)))
                      >= ratio - 1e-12)
        delta_needed = delta_of(r) if r is not None else None
        widths = threshold_widths(scores, delta_needed) if delta_needed is not None else natural
    at_gap = delta_needed is not None and delta_needed <= opts.max_delta
    extra.update(delta_needed=delta_needed, delta_used=delta_needed if at_gap else None,
                 budget_met_by_thresholds=at_gap, fallback=None if at_gap else "global-ranking")
    if at_gap:
        extra["thresholds"] = dict(zip(scores, layer_thresholds(list(scores.values()), delta_needed),
                                       strict=True))
    elif ctx.target_macs is not None:   # S3 fallback: one global ranking of the polarised factors
        _, widths, _ = solve_budget(info, ctx.target_macs,
                                    lambda r: global_threshold_widths(scores, r), iters=20)
    else:
        widths = global_threshold_widths(scores, ctx.ratio)
    return _finish(ctx, info, scores, widths, opts, extra, epochs, "mrts")


# ----------------------------------------------------------------------------------- plots
__all__ = [
    "AUTO_MAX", "AUTO_PUSH", "LAMBDA_CHAIN", "LAMBDA_COUPLED", "ScaleRegulariser", "SparsityOptions",
    "auto_sparsity", "bn_slots", "global_threshold_widths", "group_factors", "has_coupling",
    "liu_sparsity", "resolve_sparsity",
    "layer_thresholds", "make_regulariser",
    "polarization", "removed_fraction", "run_mrts", "run_slimming", "separation", "sparsity_train",
    "threshold_widths",
]
