"""Budgets: from ``--ratio`` or ``--target-macs`` to the number of channels each group keeps.

``--ratio r`` removes ``round(r * C)`` of the ``C`` channels of every group (at least one stays).
``round_to=k`` then rounds every kept width down to a multiple of ``k`` (at least ``k``; groups of
at most ``k`` channels are left as they are): vectorised CPU/GPU kernels run widths that are
multiples of 8 or 16 markedly faster than the odd widths a uniform ratio gives. ``k`` counts the
root layer's channels: in a group of tied units (grouped convs) the width moves in steps of
units that keep a multiple of ``k`` channels (:func:`unit_round_to`).
``--target-macs f`` searches, by bisection on a monotone knob (the ratio, or a method's own), the
least pruning whose model keeps at most ``f`` of the original MACs. MACs depend only on the widths,
not on which channels are kept, so candidates are counted on a copy pruned to the first channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ConfigError
from ..utils import eval_mode
from .graph import ChannelGroup, DependencyInfo
from .plan import GroupPlan, PruningPlan
from .surgery import apply_plan

Widths = dict[str, int]

#: ``round_to`` of the command line (and of a latency budget) when none is given: ONNX Runtime
#: and OpenVINO run convs whose widths are multiples of 8 markedly faster than odd widths: a
#: ResNet-8 at 40% of the MACs ran at 0.93x the original's latency on ONNX Runtime (batch 64)
#: with exact widths and 0.46x rounded to 8; issue #18: MobileNetV2 at 224x224, 50% of the MACs,
#: 1.33x exact, 0.58x rounded (measured again in bench/results/runtimes.md: exact vs rounded rows)
DEFAULT_ROUND_TO = 8


def count_macs_params(model: nn.Module, example_inputs) -> tuple[int, int]:
    """MACs per image and parameters of ``model`` (Torch-Pruning's counter; its convention is
    spelled out in :mod:`prunekit.measure.counting`). Only the first sample of a batch is used,
    so the count is per image whatever the batch size. This is the one MAC counter prunekit has:
    ``prunekit.measure.count`` calls it."""
    if isinstance(example_inputs, torch.Tensor) and example_inputs.dim() > 0:
        example_inputs = example_inputs[:1]
    with eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(round(float(macs))), int(params)


def check_fraction(name: str, value: float) -> float:
    """Validate a ratio / MACs fraction: a number strictly between 0 and 1."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < v < 1.0 or v != v:
        raise ConfigError(f"{name} must be strictly between 0 and 1, got {value}")
    return v


def check_round_to(round_to: int | None) -> int | None:
    """``None`` / 1 (no rounding) or a whole number >= 2."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or int(round_to) != round_to or round_to < 1:
        raise ConfigError(f"round_to must be a whole number >= 1, got {round_to!r}")
    return None if int(round_to) == 1 else int(round_to)


def round_width(width: int, size: int, round_to: int | None) -> int:
    """``width`` rounded down to a multiple of ``round_to`` (at least ``round_to``); a group of
    at most ``round_to`` channels, or one left whole, keeps ``width``."""
    if not round_to or size <= round_to or width >= size:
        return width
    return max(round_to, width - width % round_to)


def unit_round_to(group: ChannelGroup, round_to: int | None) -> int | None:
    """``round_to`` counted in the group's units: widths are units, and a unit of ``u`` tied
    channels (grouped convs, GhostNet's copies) keeps ``u`` channels of the root layer, so a
    multiple of ``round_to // gcd(round_to, u)`` units keeps a multiple of ``round_to``
    channels (ResNeXt's 32-group conv, units of 4: every 2 units)."""
    if not round_to or group.units is None:
        return round_to
    u = len(group.units[0])
    return round_to // math.gcd(round_to, u)


def round_widths(info: DependencyInfo, widths: Widths, round_to: int | None) -> Widths:
    """:func:`round_width` applied to every group of ``widths`` (``round_to`` in channels, see
    :func:`unit_round_to`)."""
    if not round_to:
        return dict(widths)
    groups = {g.name: g for g in info.groups}
    return {n: (round_width(w, groups[n].size, unit_round_to(groups[n], round_to)) if n in groups else w)
            for n, w in widths.items()}


#: what allocates the widths of a latency budget (:attr:`LatencyTarget.predictor`)
LATENCY_PREDICTORS = ("auto", "table", "model")


def check_predictor(predictor: str) -> str:
    """``predictor`` if it is one of :data:`LATENCY_PREDICTORS`, else a ConfigError."""
    if predictor not in LATENCY_PREDICTORS:
        raise ConfigError(f"latency predictor must be one of {', '.join(LATENCY_PREDICTORS)}, "
                          f"got {predictor!r}")
    return predictor


def keeps_shape(widths_fn: Callable[[float], Widths]) -> Callable[[float], Widths]:
    """Mark a method's ``r -> widths`` function as an allocation of its own (a global
    importance ranking, a damage-optimal allocation): a latency budget then moves only its
    knob, never re-shapes the widths (:mod:`prunekit.measure.latency_model`). Returns it."""
    widths_fn.keeps_shape = True  # type: ignore[attr-defined]
    return widths_fn


def widths_at_ratio(info: DependencyInfo, ratio: float) -> Widths:
    """Channels kept per group when a fraction ``ratio`` of each group is removed."""
    return {g.name: max(1, g.size - int(round(ratio * g.size))) for g in info.groups}


def width_plan(info: DependencyInfo, widths: Widths) -> PruningPlan:
    """A plan keeping the first ``widths[g]`` channels of each group (for counting only)."""
    return PruningPlan([GroupPlan(g.name, g.size, list(range(widths.get(g.name, g.size))))
                        for g in info.groups if widths.get(g.name, g.size) < g.size])


def macs_of_widths(info: DependencyInfo, widths: Widths) -> int:
    pruned = apply_plan(info.model, info.example_inputs, width_plan(info, widths))
    return count_macs_params(pruned, info.example_inputs)[0]


@dataclass
class LatencyTarget:
    """A measured-latency budget, given to methods in place of the MACs fraction
    (``ctx.target_macs``): keep at most ``fraction`` of the original's latency on ``runtime``
    at ``batch_size`` with ``threads`` threads. :func:`budget_widths` / :func:`solve_budget`
    solve it with :func:`prunekit.measure.latency_table.solve_latency_budget`, which records
    the predicted and measured ratios in ``result``.

    Attributes
    ----------
    fraction : float
        Latency fraction kept, in (0, 1).
    runtime : str
        One of :data:`prunekit.measure.runtimes.RUNTIMES`.
    batch_size : int
        Batch size the latency is measured at.
    threads : int, optional
        Runtime threads (default: torch's setting).
    table_rounds, max_rounds, refine_rounds : int
        Measured rounds at most of the table's allocation, then (when it did not land in the
        window) of the method's own widths searched by measurement alone, then of single
        groups widened from the widest widths measured under the window.
    slack : float
        The window ``[fraction - slack, fraction]`` the result is meant to re-time in; the
        search aims at its middle.
    margin : float
        A measured ratio within ``margin`` of either edge of the window neither ends the search
        nor is accepted, unless nothing better is found: a re-timing of the same model in
        fresh sessions moves by about that much. In every bench run up to session 14
        (``bench/results/runtimes*.json``), results accepted more than 0.01 inside the window
        re-timed inside it 75 times in 80, those within 0.01 of an edge 21 times in 34.
    confirmations, confirm_sessions : int
        Candidates measured again at most before one is accepted, and the fresh sessions each
        is measured in (the median of those sessions has to stay in the window).
    table_seconds, measure_seconds : float
        Timed seconds per table entry / per end-to-end check.
    measure_precision, confirm_precision : float or None
        Standard error of the ratio (:func:`prunekit.measure.runtimes.pair_ratio`) an
        end-to-end check / a confirmation session times on until it reaches (30 s at most;
        ``None``: ``measure_seconds`` only). At batch 64 and 224x224 one call takes about half
        a second and the seven rounds of a second measure the ratio to about +-0.03
        (``bench/results/ratio_noise.md``), more than half the window.
    use_cache : bool
        Read and write the on-disk table cache.
    fractions : tuple of float
        Candidate widths of each group in the table, as fractions of the group (fewer: a
        cheaper table, a coarser prediction; the end-to-end measurement corrects it).
    predictor : {"auto", "table", "model"}
        What allocates the widths: the per-group latency table, or a latency model of the
        widths' MACs and memory traffic fitted to end-to-end measurements
        (:mod:`prunekit.measure.latency_model`); ``auto``: the model from batch 16 on, where
        one group's saving is under the timing noise of a table entry.
    block : int, optional
        Channels per vector block of the runtime's convolution kernels on this CPU
        (:func:`prunekit.measure.runtimes.channel_block`), set when the user left ``round_to``
        to its default: where it is larger than ``round_to``, the search first keeps every
        width a multiple of ``block`` (groups of at most ``block`` channels whole), and runs
        with ``round_to`` only when the narrowest such widths measure above the window.
    depth : int or "auto"
        Residual branches of each stage that may go whole before the widths are searched
        (:mod:`prunekit.measure.latency_depth`; methods that keep the top-scoring channels;
        0: none; ``"auto"``: one, tried where widths alone pay badly,
        :func:`~prunekit.measure.latency_depth.solve_auto`).
    calibration : Tensor, optional
        Images the output change of removing each branch is measured on (default: the
        example inputs).
    progress : callable, optional
        Receives progress lines.
    """

    fraction: float
    runtime: str
    batch_size: int = 1
    threads: int | None = None
    table_rounds: int = 3
    max_rounds: int = 6
    refine_rounds: int = 4
    confirmations: int = 3
    confirm_sessions: int = 3
    slack: float = 0.05
    margin: float = 0.01
    table_seconds: float = 0.3
    measure_seconds: float = 1.0
    measure_precision: float | None = 0.02
    confirm_precision: float | None = 0.01
    use_cache: bool = True
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    predictor: str = "auto"
    block: int | None = None
    depth: int | str = 0
    calibration: torch.Tensor | None = None
    progress: Callable[[str], None] | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fraction = check_fraction("target latency", self.fraction)
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size \
                or self.batch_size < 1:
            raise ConfigError(f"latency batch size must be a positive integer, got {self.batch_size!r}")
        self.batch_size = int(self.batch_size)
        check_predictor(self.predictor)
        for name in ("measure_precision", "confirm_precision"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ConfigError(f"latency {name.replace('_', ' ')} must be positive or None, "
                                  f"got {value!r}")
        if not 0 <= self.margin < self.slack / 2:
            raise ConfigError(f"latency margin must be at least 0 and under half the slack "
                              f"({self.slack}), got {self.margin!r}")


def solve_budget(info: DependencyInfo, target_macs: float,
                 widths_fn: Callable[[float], Widths] | None = None, *,
                 iters: int = 14, round_to: int | None = None) -> tuple[float, Widths, float]:
    """Smallest knob value ``r`` in (0, 1) whose widths keep at most ``target_macs`` of the MACs.

    Parameters
    ----------
    info : DependencyInfo
    target_macs : float
        Fraction of the original MACs allowed, in (0, 1).
    widths_fn : callable, optional
        ``r -> widths``, non-increasing in ``r``; default :func:`widths_at_ratio`.
    round_to : int, optional
        Round every candidate's widths with :func:`round_widths` (rounding down keeps the
        knob monotone).

    Returns
    -------
    (r, widths, macs_fraction)
    """
    if isinstance(target_macs, LatencyTarget):
        from ..measure.latency_table import solve_latency_budget

        return solve_latency_budget(info, target_macs, widths_fn, round_to=check_round_to(round_to))
    target = check_fraction("target MACs", target_macs)
    raw = widths_fn or (lambda r: widths_at_ratio(info, r))
    round_to = check_round_to(round_to)

    def fn(r: float) -> Widths:
        return round_widths(info, raw(r), round_to)
    base = count_macs_params(info.model, info.example_inputs)[0]
    lo, hi = 0.0, 0.999
    best = (hi, fn(hi), macs_of_widths(info, fn(hi)) / base)
    if best[2] > target:
        raise ConfigError(f"target MACs {target:.3f} is below what pruning can reach for this model "
                          f"({best[2]:.3f} at one channel per layer)")
    cache: dict[tuple, float] = {}
    for _ in range(iters):
        mid = (lo + hi) / 2
        w = fn(mid)
        key = tuple(sorted(w.items()))
        frac = cache.get(key)
        if frac is None:
            frac = cache[key] = macs_of_widths(info, w) / base
        if frac <= target:
            hi = mid
            best = (mid, w, frac)
        else:
            lo = mid
    return best


def budget_widths(info: DependencyInfo, ratio: float | None, target_macs: float | None,
                  widths_fn: Callable[[float], Widths] | None = None, *,
                  round_to: int | None = None) -> tuple[float, Widths, float | None]:
    """The widths of a ``--ratio`` or ``--target-macs`` budget, the one place where every
    method's widths are rounded (``round_to``).

    With ``target_macs`` (a fraction, or a :class:`LatencyTarget`) this is
    :func:`solve_budget`; with ``ratio`` the widths ``widths_fn(ratio)`` (default
    :func:`widths_at_ratio`), rounded by :func:`round_widths`.

    Returns
    -------
    (r, widths, macs_fraction)
        ``macs_fraction`` is ``None`` for a ratio budget (not counted).
    """
    if target_macs is not None:
        return solve_budget(info, target_macs, widths_fn, round_to=round_to)
    r = check_fraction("ratio", ratio)
    fn = widths_fn or (lambda q: widths_at_ratio(info, q))
    return r, round_widths(info, fn(r), check_round_to(round_to)), None

