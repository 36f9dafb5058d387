"""A latency model fitted by measurement, for batch sizes where a per-group table cannot see.

At a large batch a per-group table (one group cut, the rest whole, timed against the original;
:class:`~prunekit.measure.latency_table.LatencyTable`) measures savings of one to five percent
under a between-session noise of two to four percent, so its allocation is noise (MobileNetV2
at 224x224, batch 64, ONNX Runtime: 0.95 predicted for the narrowest widths, 0.17 measured).
There the model's latency is better described by what the runtime has to move and compute,
counted exactly for any widths from the dependency groups and fitted to a few end-to-end
measurements, each with a large signal:

.. math::

    \\frac{T(w)}{T(\\text{original})} \\approx 1 + \\alpha\\,(m(w) - 1) + \\beta\\,(b(w) - 1),

where ``m(w)`` is the fraction of the original's multiply-accumulates kept and ``b(w)`` the
fraction of its memory traffic kept (every conv, linear and norm layer's input and output
activations, of one image unless ``batch_size`` says otherwise, and its parameters; batch
norms are left out, as deployment runtimes fold them into the conv before them), and
``alpha, beta >= 0`` are least-squares fits over the measured models (``1 - alpha - beta``:
the part of the time that pruning does not change). Memory traffic is
why an inverted-residual network is memory-bound at a large batch: its depthwise convs and
expanded activations scale with the widths, its MACs with their product, so cutting the
expanded (hidden) widths saves more time per channel than cutting the narrow residual stream,
and the allocation (:func:`cut_down`) follows the predicted saving per unit of value removed
(MACs-weighted log widths), as a knapsack over a latency model does in HALP [1]_; the fit
follows the roofline view of time as the larger of compute and memory traffic, here their
fitted sum [2]_.

References
----------
.. [1] M. Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (HALP), NeurIPS 2022.
.. [2] S. Williams, A. Waterman, D. Patterson, "Roofline: an insightful visual performance model
   for multicore architectures", Communications of the ACM 52(4), 2009.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["CostModel", "cut_down"]


@dataclass
class _Layer:
    """One layer's share of the counts and the groups that set its input / output widths."""

    macs: float
    elems_in: float
    elems_out: float
    weight: float  # elements of the weight (scales like the MACs)
    per_out: float  # other parameters, one per output channel (bias, a norm's shift)
    ins: list[tuple[str, float]] = field(default_factory=list)   # (group, share of its inputs)
    outs: list[tuple[str, float]] = field(default_factory=list)  # (group, share of its outputs)
    channelwise: bool = False  # depthwise conv, a norm: one channel in, the same channel out


def _channels(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    n = getattr(m, "num_features", None) or getattr(m, "num_channels", None) \
        or (m.normalized_shape[-1] if isinstance(m, nn.LayerNorm) else None)
    return (int(n), int(n)) if n else (0, 0)


def _macs(m: nn.Module, out: torch.Tensor) -> float:
    if isinstance(m, nn.modules.conv._ConvNd):
        k = 1
        for s in m.kernel_size:
            k *= s
        return float(out.numel() * m.in_channels // m.groups * k)
    if isinstance(m, nn.Linear):
        return float(out.numel() * m.in_features)
    return float(2 * out.numel())  # a norm: scale and shift


class CostModel:
    """Multiply-accumulates and memory traffic of a model at any group widths, and a latency
    ratio fitted to measurements (module docstring).

    Parameters
    ----------
    info : DependencyInfo
        The model's dependency groups (:func:`prunekit.engine.analyse`).
    batch_size : int
        Images whose activations are counted beside the parameters, which are counted once
        (the traffic of a call at that batch size). The ``--target-latency`` search counts one
        image's (the default) at every batch size: counting the whole batch's, though closer
        to what a runtime moves, measured no better (``bench/results/efficiency_frontier.md``,
        ``runtimes_session16_b64.md``); the fitted weights absorb the difference.

    Attributes
    ----------
    sizes : dict
        Group name -> size (units).
    alpha, beta : float
        Fitted weights of the MACs and memory-traffic fractions (before any fit: 0.5 each).
    """

    def __init__(self, info: Any, batch_size: int = 1) -> None:
        self.sizes = {g.name: g.size for g in info.groups}
        self.batch_size = int(batch_size)
        self.alpha, self.beta = 0.5, 0.5
        #: the measured ratio of ``info.model`` to the original the budget counts against
        #: (below 1 when residual branches were removed first); predictions are scaled by it
        self.scale = 1.0
        mods = dict(info.model.named_modules())
        counted: dict[str, tuple[float, float, float, float]] = {}

        def hook(name: str):
            def fn(m: nn.Module, inp: tuple, out: Any) -> None:
                if name in counted or not isinstance(out, torch.Tensor) or not inp \
                        or not isinstance(inp[0], torch.Tensor):
                    return
                w = getattr(m, "weight", None)
                weight = float(w.numel()) if isinstance(w, torch.Tensor) else 0.0
                rest = float(sum(p.numel() for p in m.parameters(recurse=False))) - weight
                counted[name] = (_macs(m, out), float(inp[0].numel()), float(out.numel()), weight, rest)
            return fn

        # batch norms are not counted: a deployment runtime folds them into the conv before
        wanted = {n for n, m in mods.items()
                  if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm, nn.GroupNorm))}
        handles = [mods[n].register_forward_hook(hook(n)) for n in wanted]
        try:
            x = info.example_inputs
            with torch.no_grad():
                info.model(x[:1] if isinstance(x, torch.Tensor) else x)
        finally:
            for h in handles:
                h.remove()
        self.layers: dict[str, _Layer] = {n: _Layer(*c) for n, c in counted.items()}
        for g in info.groups:
            for s in g.slots:
                lay = self.layers.get(s.name)
                if lay is None:
                    continue
                cin, cout = _channels(s.module)
                carried = sum(len(v) for v in s.positions.values())
                if s.role == "producer" and cout:
                    lay.outs.append((g.name, carried / cout))
                elif s.role == "consumer" and cin:
                    lay.ins.append((g.name, carried / cin))
                elif s.role == "channelwise" and cout:
                    lay.channelwise = True
                    lay.ins.append((g.name, carried / cout))
                    lay.outs.append((g.name, carried / cout))
        self.by_group: dict[str, list[_Layer]] = {g: [] for g in self.sizes}
        for lay in self.layers.values():
            for g in {n for n, _ in lay.ins + lay.outs}:
                self.by_group.setdefault(g, []).append(lay)
        full = self._sums(self.layers.values(), {})
        self.macs0, self.bytes0 = max(full[0], 1.0), max(full[1], 1.0)
        #: the fraction of the model's MACs each group's channels take part in
        self.macs_share = {g: 1.0 - self._sums(self.layers.values(), {g: 0})[0] / self.macs0
                           for g in self.sizes}

    def _frac(self, parts: Sequence[tuple[str, float]], widths: dict[str, int]) -> float:
        return 1.0 - sum(share * (1.0 - min(widths.get(g, self.sizes[g]), self.sizes[g]) / self.sizes[g])
                         for g, share in parts)

    def _sums(self, layers: Any, widths: dict[str, int]) -> tuple[float, float]:
        macs = traffic = 0.0
        for lay in layers:
            fi, fo = self._frac(lay.ins, widths), self._frac(lay.outs, widths)
            scale = fo if lay.channelwise else fi * fo
            macs += lay.macs * scale
            traffic += (self.batch_size * (lay.elems_in * fi + lay.elems_out * fo)
                        + lay.weight * scale + lay.per_out * fo)
        return macs, traffic

    def features(self, widths: dict[str, int]) -> tuple[float, float]:
        """``(m, b)``: fractions of the original's MACs and memory traffic kept at ``widths``."""
        macs, traffic = self._sums(self.layers.values(), widths)
        return macs / self.macs0, traffic / self.bytes0

    def predict(self, widths: dict[str, int]) -> float:
        """Predicted latency ratio at ``widths`` (groups not named stay whole)."""
        m, b = self.features(widths)
        return self.scale * (1.0 + self.alpha * (m - 1.0) + self.beta * (b - 1.0))

    def step_ratio(self, widths: dict[str, int], current: float, group: str, width: int) -> float:
        """Predicted ratio after setting ``group`` to ``width`` (``current``: at ``widths``);
        counts only the layers the group touches."""
        layers = self.by_group.get(group, [])
        m0, b0 = self._sums(layers, widths)
        m1, b1 = self._sums(layers, {**widths, group: width})
        return current + self.scale * (self.alpha * (m1 - m0) / self.macs0
                                       + self.beta * (b1 - b0) / self.bytes0)

    def fit(self, points: Sequence[tuple[dict[str, int], float]]) -> None:
        """Least-squares ``alpha, beta >= 0`` over measured ``(widths, ratio)`` points."""
        xs = [(m - 1.0, b - 1.0, r / self.scale - 1.0)
              for (m, b), r in ((self.features(w), r) for w, r in points)]
        smm = sum(a * a for a, _, _ in xs)
        sbb = sum(b * b for _, b, _ in xs)
        smb = sum(a * b for a, b, _ in xs)
        smr = sum(a * r for a, _, r in xs)
        sbr = sum(b * r for _, b, r in xs)
        det = smm * sbb - smb * smb
        if det > 1e-12 * max(smm * sbb, 1e-30):
            a, b = (smr * sbb - sbr * smb) / det, (sbr * smm - smr * smb) / det
            if a >= 0 and b >= 0:
                self.alpha, self.beta = a, b
                return
        # one feature alone (the other's weight at its bound, 0): the better fit of the two;
        # where both fit equally (one point: both exactly), the MACs alone, not whichever the
        # rounding of the two errors favours
        best = None
        for a, b in ((max(smr / smm, 0.0) if smm else 0.0, 0.0), (0.0, max(sbr / sbb, 0.0) if sbb else 0.0)):
            err = sum((r - a * m - b * bb) ** 2 for m, bb, r in xs)
            if best is None or err < best[0] - 1e-9 * (1.0 + smr * smr + sbr * sbr):
                best = (err, a, b)
        if best is not None and best[1] + best[2] > 0:
            self.alpha, self.beta = best[1], best[2]

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}


def cut_down(model: CostModel, floor: dict[str, int], aim: float,
             round_to: dict[str, int | None]) -> dict[str, int]:
    """Widths predicted within ``aim`` by ``model``: from the whole model, one ``round_to``
    step at a time, cut the group whose step saves the most predicted latency per unit of
    value lost (never below ``floor``); stops at the first widths within ``aim``.

    The value of a group's widths is ``s_g log(w_g / size_g)``, ``s_g`` the fraction of the
    model's MACs its channels take part in (:attr:`CostModel.macs_share`): the greedy
    maximises the MACs-weighted geometric mean of the kept fractions under the predicted
    latency, so a group that carries much of the computation stays wide, every cut costs
    more the narrower the group already is, and no group is cut to nothing where a little
    from many others saves the same time."""
    from ..engine.budget import round_width

    widths = dict(model.sizes)
    current = model.predict(widths)
    while current > aim:
        best: tuple[float, str, int, float] | None = None
        for g, w in widths.items():
            size = model.sizes[g]
            nw = round_width(w - 1, size, round_to.get(g)) if w > 1 else w
            if nw >= w or nw < floor.get(g, 1):
                continue
            pred = model.step_ratio(widths, current, g, nw)
            gain = (current - pred) / (max(model.macs_share[g], 1e-6) * math.log(w / nw))
            if best is None or gain > best[0]:
                best = (gain, g, nw, pred)
        if best is None:
            break
        _, g, nw, current = best
        widths[g] = nw
    return widths
