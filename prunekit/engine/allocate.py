"""Layer-adaptive widths: spend a MACs budget where each channel costs the least damage.

A uniform ratio removes the same share of every group, although groups differ by far in what a
channel costs (MACs) and in what removing it destroys. Given, for every group ``g``, a damage
curve ``e_g(k)`` (the error when ``k`` of its ``C_g`` channels are kept, e.g. the refit error of
:func:`prunekit.methods.elimination.eliminate`), the allocation solves

    minimise  sum_g e_g(k_g)   subject to   MACs(k) <= f * MACs(original)

by Lagrangian relaxation, as in the multiple-choice knapsack: for a price ``lambda`` each group
picks ``argmin_k e_g(k) + lambda * c_g * k`` independently (``c_g``: the MACs one channel of ``g``
costs at the current widths), and ``lambda`` is bisected until the MACs predicted by
:class:`MacsModel` meet the budget. MACs are bilinear in the widths of adjacent groups, so the
per-channel costs are re-measured at the solution and the bisection repeated (``refresh``
rounds); the budget left by the discrete choice is given back step by step, and the final widths
are counted exactly on a pruned copy (:func:`prunekit.engine.budget.macs_of_widths`).

References
----------
Everett, H. (1963). Generalized Lagrange multiplier method for solving problems of optimum
allocation of resources. Operations Research 11(3), 399-417.

Yang, T.-J. et al. (2018). NetAdapt: platform-aware neural network adaptation for mobile
applications. ECCV (per-layer resource-constrained width selection).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from .budget import (
    Widths,
    check_fraction,
    count_macs_params,
    macs_of_widths,
    round_width,
    unit_round_to,
)
from .graph import DependencyInfo

__all__ = ["MacsModel", "allocate_widths", "channel_costs"]


class MacsModel:
    """The MACs of conv and linear layers as a function of the groups' widths, from one traced
    forward pass: ``out(w) * in(w) / groups * kh * kw * positions`` per layer, where ``out`` and
    ``in`` lose ``(C_g - w_g)`` times the positions per channel of every group the layer
    produces (or carries channel-wise) and reads. A fast predictor for the allocation (no copy
    of the model per candidate); the final widths are always counted exactly.
    """

    def __init__(self, info: DependencyInfo) -> None:
        self.sizes = {g.name: g.size for g in info.groups}
        spatial: dict[nn.Module, int] = {}

        def hook(m, _args, y):
            if isinstance(y, torch.Tensor) and y.dim() >= 2:
                if isinstance(m, nn.Conv2d):
                    spatial[m] = int(y[0, 0].numel())
                else:
                    spatial[m] = int(y[0].numel() // y.shape[-1])

        mods = [m for m in info.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        handles = [m.register_forward_hook(hook) for m in mods]
        try:
            with torch.no_grad():
                was = info.model.training
                info.model.eval()
                info.model(info.example_inputs[:1])
                info.model.train(was)
        finally:
            for h in handles:
                h.remove()
        #: per layer: (out, in, groups, kernel * positions, depthwise, {group: out per channel},
        #: {group: in per channel})
        self.layers = []
        for m in mods:
            if m not in spatial:
                continue
            outs: dict[str, int] = {}
            ins: dict[str, int] = {}
            for g in info.groups:
                for slot in g.producers + g.channelwise:
                    if slot.module is m:
                        outs[g.name] = outs.get(g.name, 0) + len(next(iter(slot.positions.values())))
                for slot in g.consumers:
                    if slot.module is m:
                        ins[g.name] = ins.get(g.name, 0) + len(next(iter(slot.positions.values())))
            if isinstance(m, nn.Conv2d):
                k = int(m.weight[0, 0].numel()) * spatial[m]
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                self.layers.append((m.out_channels, m.in_channels, m.groups, k, dw, outs, ins))
            else:
                self.layers.append((m.out_features, m.in_features, 1, spatial[m], False, outs, ins))
        self.full = self.macs(self.sizes)

    def macs(self, widths: Widths) -> float:
        total = 0.0
        for out, inn, groups, k, dw, outs, ins in self.layers:
            o = out - sum((self.sizes[g] - widths.get(g, self.sizes[g])) * p for g, p in outs.items())
            if dw:  # a depthwise conv: one input channel per output channel
                total += max(o, 0) * k
                continue
            i = inn - sum((self.sizes[g] - widths.get(g, self.sizes[g])) * p for g, p in ins.items())
            total += max(o, 0) * max(i, 0) / groups * k
        return total

    def fraction(self, widths: Widths) -> float:
        return self.macs(widths) / max(self.full, 1e-12)


def channel_costs(model: MacsModel, widths: Widths, groups: list[str]) -> dict[str, float]:
    """Predicted MACs one channel of each group costs at ``widths`` (one channel less)."""
    base = model.macs(widths)
    return {n: max(base - model.macs({**widths, n: widths[n] - 1}), 0.0) if widths[n] > 1
            else max(model.macs({**widths, n: 2}) - base, 0.0) for n in groups}


def _candidates(size: int, round_to: int | None, min_width: int) -> list[int]:
    ks = sorted({round_width(k, size, round_to) for k in range(max(1, min_width), size + 1)})
    return ks if size in ks else ks + [size]


def allocate_widths(info: DependencyInfo, curves: Mapping[str, torch.Tensor], target_macs: float, *,
                    round_to: int | None = None, min_width: int = 1, refresh: int = 2,
                    iters: int = 40) -> tuple[Widths, float]:
    """Widths of the groups in ``curves`` that keep at most ``target_macs`` of the MACs at the
    least summed damage (the other groups keep all their channels).

    The search runs on :class:`MacsModel`'s prediction; the result is counted exactly
    (:func:`~prunekit.engine.budget.macs_of_widths`) and, should the count exceed the budget,
    searched again against a tighter predicted budget.

    Parameters
    ----------
    info : DependencyInfo
        The model's groups (its model is only copied for counting).
    curves : mapping of group name -> Tensor [C + 1]
        ``curves[g][k]``: damage with ``k`` channels kept; non-increasing in ``k`` is expected
        but not required (the choice is the minimum of the priced curve either way).
    target_macs : float
        Fraction of the original MACs allowed, in (0, 1).
    round_to : int, optional
        Only widths that :func:`~prunekit.engine.budget.round_width` leaves unchanged.
    min_width : int
        Fewest channels a group keeps.
    refresh : int
        Rounds of re-measuring the per-channel costs at the current solution.
    iters : int
        Bisection steps on the price (log scale).

    Returns
    -------
    (widths, macs_fraction)
        ``macs_fraction`` is the exact count.

    Raises
    ------
    ConfigError
        When even the narrowest candidate widths exceed the budget.
    """
    target = check_fraction("target MACs", target_macs)
    names = [g.name for g in info.groups if g.name in curves]
    sizes = {g.name: g.size for g in info.groups}
    for n in names:
        if len(curves[n]) != sizes[n] + 1:
            raise ConfigError(f"damage curve of {n!r} has {len(curves[n])} entries, expected {sizes[n] + 1}")
    by_name = {g.name: g for g in info.groups}
    cands = {n: _candidates(sizes[n], unit_round_to(by_name[n], round_to), min_width) for n in names}
    base = count_macs_params(info.model, info.example_inputs)[0]

    def exact(w: Widths) -> float:
        return macs_of_widths(info, {**sizes, **w}) / base

    narrow = {n: cands[n][0] for n in names}
    if exact(narrow) > target:
        raise ConfigError(f"target MACs {target:.3f} is below what pruning these groups can reach "
                          f"({exact(narrow):.3f} at the narrowest widths)")
    damage = {n: torch.as_tensor(curves[n], dtype=torch.float64) for n in names}
    model = MacsModel(info)
    goal = target
    widths = narrow
    for _ in range(6):
        widths = _fill(model, _lagrange(model, damage, cands, names, sizes, goal, refresh, iters),
                       goal, names, cands, damage)
        used = exact(widths)
        if used <= target:
            return widths, used
        goal -= (used - target) + 1e-3  # the prediction was optimistic: aim lower
    return narrow, exact(narrow)


def _lagrange(model: MacsModel, damage: dict[str, torch.Tensor], cands: dict[str, list[int]],
              names: list[str], sizes: dict[str, int], goal: float, refresh: int, iters: int) -> Widths:
    """Bisection on the price of a MAC until the predicted fraction meets ``goal``."""

    def choose(costs: dict[str, float], lam: float) -> Widths:
        out = {}
        for n in names:
            ks = torch.tensor(cands[n])
            priced = damage[n][ks] + lam * costs[n] / model.full * ks.double()
            out[n] = int(ks[int(torch.argmin(priced))])
        return out

    narrow = {n: cands[n][0] for n in names}
    widths: Widths = {n: sizes[n] for n in names}
    best: Widths | None = None
    for _ in range(refresh + 1):
        costs = channel_costs(model, {**sizes, **widths}, names)
        lo, hi = -12.0, 12.0  # log10 of the price
        found = None
        for _ in range(iters):
            mid = (lo + hi) / 2
            w = choose(costs, 10 ** mid)
            if model.fraction({**sizes, **w}) <= goal:
                hi, found = mid, w
            else:
                lo = mid
        widths = found if found is not None else narrow
        if best is None or _total(damage, widths) < _total(damage, best):
            best = dict(widths)
    assert best is not None
    return best


def _total(damage: dict[str, torch.Tensor], widths: Widths) -> float:
    return float(sum(damage[n][k] for n, k in widths.items()))


def _fill(model: MacsModel, widths: Widths, goal: float, names: list[str],
          cands: dict[str, list[int]], damage: dict[str, torch.Tensor]) -> Widths:
    """Give back the budget the discrete choice left unused: widen, one candidate step at a
    time, the group with the largest damage reduction per MAC whose step still fits."""
    widths = dict(widths)
    while True:
        full = {**model.sizes, **widths}
        base = model.macs(full)
        options = []
        for n in names:
            up = [k for k in cands[n] if k > widths[n]]
            if not up:
                continue
            k = up[0]
            cost = model.macs({**full, n: k}) - base
            gain = float(damage[n][widths[n]] - damage[n][k])
            options.append((-gain / max(cost, 1e-12), cost, n, k))
        for _, _, n, k in sorted(options):
            if model.fraction({**full, n: k}) <= goal:
                widths[n] = k
                break
        else:
            return widths
