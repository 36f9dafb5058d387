"""A measured latency budget: ``--target-latency f --runtime R``.

The widths that keep at most a fraction ``f`` of the original's latency on runtime ``R`` are
found in three steps, after NetAdapt [1]_ (latency measured on the target platform, tabulated
per layer) and HALP [2]_ (a latency lookup table constraining the widths):

1. **Table** (:func:`build_table`): for every dependency group ``g`` and a few candidate widths
   ``w`` (a quarter, a half and three quarters of the group, rounded like the budget), the model
   with only ``g`` cut to ``w`` (first channels: latency depends on the widths only) is timed on
   ``R`` interleaved with the original; its latency ratio ``t_g(w)`` is stored. The table is
   cached on disk per model architecture, input shape, runtime, batch size, threads and library
   versions (``$PRUNEKIT_CACHE``, default ``~/.cache/prunekit``).
2. **Allocation**: the table predicts a model's ratio as ``prod_g t_g(w_g)`` (piecewise
   linear between the measured widths; see :meth:`LatencyTable.predict`). The method's own
   widths function (its ranking: uniform per group, or a global ranking of channel importance)
   is searched by
   bisection for the least pruning whose predicted ratio meets the budget, so the channels
   removed are the least important ones in the method's own order; then :func:`fill_back`
   gives back channels, group by group, where the table says they cost least, while the
   prediction stays within the budget.
3. **Measure and correct**: the narrowest widths are built and timed first (a target below
   them cannot be reached: :class:`~prunekit.errors.ConfigError`), then the table's own
   allocation for ``f``. While the measured ratio lies outside ``[f - slack, f]`` the next
   predicted budget is interpolated (on a log scale) between the measured allocations that
   bracket the middle of that window (regula falsi: each measurement corrects the table).
   The window less a ``margin`` at each edge is what ends the search and is accepted: a
   result accepted near an edge re-times outside the window about half the time (see
   :class:`~prunekit.engine.budget.LatencyTarget`).
   Where the table errs beyond what that fixes in ``table_rounds`` rounds (a runtime that
   fuses or pads some layers, so that one group's cost depends on its neighbours' widths),
   the method's own widths are searched the same way by measurement alone. Those move every
   group at once in ``round_to`` steps, which on a small model can jump over the window; then
   the widest widths measured under it are widened one group step at a time where the table
   says it costs least (:func:`fill_back`), the aim corrected by measurement (NetAdapt's
   layer-by-layer steps). Of the allocations measured in the window, the one that keeps the
   most MACs (else the slowest measured within ``f``) is measured again in
   ``confirm_sessions`` fresh sessions and wins if their median stays in the window (less
   its margins): two sessions of the same model differ by more than one session's timing
   noise (MobileNetV2 at batch 64: a standard deviation of 0.02-0.04 of the ratio between
   sessions, however long each is timed), and the measurement that made it a candidate is
   biased towards the window (it was picked for landing there), so it does not vote. A
   candidate whose median leaves the window sends the search on from what it has measured
   (the median now stands for it) when no other candidate waits in the window, or when it
   kept clearly more MACs per measured millisecond than every one that waits, up to
   ``confirmations`` times; then the widest candidates within ``f`` are confirmed in turn.

From a latency batch of 16 on (``LatencyTarget.predictor``, ``"auto"``) one group's saving is
under the timing noise of a table entry; there steps 1-2 use a latency model of the widths'
MACs and memory traffic fitted to the end-to-end measurements instead
(:mod:`prunekit.measure.latency_model`), and step 3 is the same.

With ``LatencyTarget.block`` (the runtime's channel block on this CPU,
:func:`~prunekit.measure.runtimes.channel_block`; set when ``round_to`` is left to its default)
the three steps run first on the groups wider than the block, every width a multiple of it, the
others whole: the runtimes pad a width to the next multiple of the block, which neither the
table nor the model sees. Where the narrowest of those widths measure above the window, they
run again in multiples of ``round_to`` (:func:`solve_latency_budget`).

References
----------
.. [1] T.-J. Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
   Applications", ECCV 2018.
.. [2] M. Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (HALP), NeurIPS 2022.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import atomic_path
from .latency_model import CostModel, cut_down
from .runtimes import Session, check_runtimes, pair_ratio, time_pair
from .timing import _num_threads, batched_input

__all__ = ["LatencyTable", "build_table", "cache_dir", "measure_ratio", "solve_latency_budget"]

#: candidate widths of each group in the table, as fractions of the group
FRACTIONS = (0.25, 0.5, 0.75)
#: from this batch size on, ``predictor="auto"`` fits a latency model instead of a per-group
#: table: one group's saving is then under the between-session noise (latency_model.py)
MODEL_FROM_BATCH = 16
#: a shape of the latency model's search that missed the window is searched on when, near the
#: window, it kept this many times the MACs per measured millisecond of the accepted candidate
SHAPE_GAIN = 1.1
#: proposals per measured round of a search (widths measured before cost no round)
REPEATS = 4
#: bump when the table's meaning changes (old cache files are then ignored)
TABLE_VERSION = 1


def cache_dir() -> Path:
    """Where latency tables are cached: ``$PRUNEKIT_CACHE`` or ``~/.cache/prunekit``."""
    root = os.environ.get("PRUNEKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "prunekit"


@dataclass
class LatencyTable:
    """Measured latency ratios ``ratios[group][width]`` (one group cut, the rest whole) of a
    model on one runtime, batch size and thread count."""

    runtime: str
    batch_size: int
    threads: int
    base_ms: float
    sizes: dict[str, int]
    ratios: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: float = 0.0
    #: the ratio of the model the table was measured on to the original the budget counts
    #: against (below 1 when residual branches were removed first; not stored in the cache)
    scale: float = 1.0

    def group_ratio(self, group: str, width: int) -> float:
        """``t_g(w)``: piecewise linear through the measured widths and (size, 1.0); below the
        smallest measured width the last segment's slope continues (never below 0)."""
        size = self.sizes.get(group)
        if size is None or width >= size:
            return 1.0
        pts = sorted({**self.ratios.get(group, {}), size: 1.0}.items())
        if len(pts) == 1:
            return 1.0
        for (w0, r0), (w1, r1) in zip(pts, pts[1:], strict=False):
            if w0 <= width <= w1:
                return r0 + (r1 - r0) * (width - w0) / (w1 - w0)
        (w0, r0), (w1, r1) = pts[0], pts[1]
        return max(0.0, r0 - (r1 - r0) * (w0 - width) / (w1 - w0))

    def predict(self, widths: dict[str, int]) -> float:
        """Predicted latency ratio of a model with ``widths`` (groups not named stay whole):
        the product of the groups' ratios. A layer between two cut groups shrinks by the
        product of both fractions; the product over all groups also multiplies the savings of
        layers that only one group touches, so it errs on the slow side (the sum of savings
        errs on the fast side, and the budget would be missed)."""
        out = self.scale
        for g, w in widths.items():
            out *= max(self.group_ratio(g, w), 1e-3)
        return out

    def step_ratio(self, widths: dict[str, int], current: float, group: str, width: int) -> float:
        """Predicted ratio after setting ``group`` to ``width`` (``current``: at ``widths``)."""
        w = widths.get(group, self.sizes.get(group, width))
        return current * max(self.group_ratio(group, width), 1e-3) / max(self.group_ratio(group, w), 1e-3)

    def to_json(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "runtime": self.runtime, "batch_size": self.batch_size,
                "threads": self.threads, "base_ms": self.base_ms, "sizes": self.sizes,
                "ratios": {g: {str(w): r for w, r in rs.items()} for g, rs in self.ratios.items()},
                "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        return cls(d["runtime"], int(d["batch_size"]), int(d["threads"]), float(d["base_ms"]),
                   {g: int(s) for g, s in d["sizes"].items()},
                   {g: {int(w): float(r) for w, r in rs.items()} for g, rs in d["ratios"].items()},
                   float(d.get("seconds", 0.0)))


def measure_ratio(model: nn.Module, original: nn.Module, example_input: torch.Tensor, runtime: str,
                  batch_size: int, threads: int, *, max_seconds: float = 0.5,
                  workdir: Path | None = None, original_session: Session | None = None,
                  precision: float | None = None) -> tuple[float, float, float]:
    """``model``'s latency over ``original``'s on ``runtime``, timed interleaved; returns
    ``(ratio, model_ms, original_ms)``: the median per-round ratio
    (:func:`~prunekit.measure.runtimes.pair_ratio`) and the two medians. ``precision``: time
    on until the ratio's standard error is at most this (up to 30 s,
    :func:`~prunekit.measure.runtimes.time_pair`)."""
    with tempfile.TemporaryDirectory(prefix="prunekit-lat-") as tmp:
        wd = workdir or Path(tmp)
        x = batched_input(example_input, batch_size)
        ref = original_session or Session(original, runtime, x, threads, wd)
        sess = Session(model, runtime, x, threads, wd)
        with _num_threads(threads):
            ta, tb = time_pair(ref.caller(x), sess.caller(x), max_seconds=max_seconds, min_repeats=7,
                               precision=precision)
    return pair_ratio(ta, tb)[0], statistics.median(tb) * 1e3, statistics.median(ta) * 1e3


def _candidates(size: int, round_to: int | None, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    from ..engine.budget import round_width

    out = {round_width(max(1, int(round(size * q))), size, round_to) for q in fractions}
    return sorted(w for w in out if 1 <= w < size)


def _key(model: nn.Module, x: torch.Tensor, runtime: str, batch_size: int, threads: int,
         candidates: dict[str, list[int]]) -> str:
    versions = {"torch": torch.__version__}
    for mod in ("onnxruntime", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    text = json.dumps({"v": TABLE_VERSION, "arch": str(model), "shape": list(x.shape[1:]),
                       "runtime": runtime, "batch": batch_size, "threads": threads,
                       "candidates": candidates, "versions": versions,
                       "machine": [platform.machine(), platform.processor(), os.cpu_count()]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_table(info: Any, runtime: str, batch_size: int = 1, threads: int | None = None, *,
                round_to: int | None = None, max_seconds: float = 0.3, use_cache: bool = True,
                progress: Callable[[str], None] | None = None,
                fractions: Sequence[float] = FRACTIONS) -> tuple[LatencyTable, dict[str, Any]]:
    """Measure (or read from the cache) the latency table of ``info.model`` (a
    :class:`~prunekit.engine.DependencyInfo`) on ``runtime``.

    Returns
    -------
    (table, about)
        ``about``: ``cached`` (read from disk), ``path`` (the cache file), ``measurements``.
    """
    from ..engine.budget import apply_plan, unit_round_to, width_plan

    (runtime,) = check_runtimes([runtime])
    threads = int(threads) if threads is not None else torch.get_num_threads()
    x = info.example_inputs
    if not isinstance(x, torch.Tensor):
        raise ConfigError("a latency budget needs a model that takes one input tensor")
    sizes = {g.name: g.size for g in info.groups}
    candidates = {g.name: _candidates(g.size, unit_round_to(g, round_to), fractions) for g in info.groups}
    path = cache_dir() / f"latency-{_key(info.model, x, runtime, batch_size, threads, candidates)}.json"
    if use_cache and path.is_file():
        try:
            table = LatencyTable.from_json(json.loads(path.read_text()))
            return table, {"cached": True, "path": str(path), "measurements": 0}
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again
    t0 = time.perf_counter()
    xb = batched_input(x, batch_size)
    table = LatencyTable(runtime, batch_size, threads, 0.0, sizes)
    n = sum(len(c) for c in candidates.values())
    done = 0
    with tempfile.TemporaryDirectory(prefix="prunekit-table-") as tmp:
        ref = Session(info.model, runtime, xb, threads, Path(tmp))
        base: list[float] = []
        shown = 0
        for g, ws in candidates.items():
            for w in ws:
                done += 1
                if progress is not None and (done == 1 or done - shown >= max(1, n // 5)):
                    shown = done  # about five lines per table
                    progress(f"latency table on {runtime}, batch {batch_size}: measurement "
                             f"{done}/{n} ({g} at width {w})")
                cut = apply_plan(info.model, x, width_plan(info, {g: w}))
                ratio, _, ref_ms = measure_ratio(cut, info.model, x, runtime, batch_size, threads,
                                                 max_seconds=max_seconds, workdir=Path(tmp),
                                                 original_session=ref)
                table.ratios.setdefault(g, {})[w] = ratio
                base.append(ref_ms)
    table.base_ms = float(torch.tensor(base).median()) if base else 0.0
    table.seconds = time.perf_counter() - t0
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp_path:
                tmp_path.write_text(json.dumps(table.to_json()))
        except (OSError, ConfigError):
            pass  # an unwritable cache only costs a new measurement next time
    return table, {"cached": False, "path": str(path), "measurements": n}


class _OffBlock(Exception):
    """The narrowest widths on the channel block measured above the window (``measured``)."""

    def __init__(self, measured: float) -> None:
        super().__init__(measured)
        self.measured = measured


def solve_latency_budget(info: Any, target: Any, widths_fn: Callable[[float], dict[str, int]] | None,
                         *, round_to: int | None = None, iters: int = 14,
                         reference: nn.Module | None = None, scale: float = 1.0
                         ) -> tuple[float, dict[str, int], float]:
    """The widths of a :class:`~prunekit.engine.budget.LatencyTarget` (steps 2 and 3 of the
    module docstring); fills ``target.result``. Returns ``(r, widths, macs_fraction)``.

    With ``target.block`` larger than ``round_to`` the widths are searched on the runtime's
    channel block first: every group wider than ``block`` cut in multiples of it, narrower ones
    whole. Where the narrowest of those widths measure above the window (under its accepted
    low edge), the whole search runs again with ``round_to`` (``result["block"]`` tells).

    With ``target.depth`` residual branches are removed whole first
    (:func:`prunekit.measure.latency_depth.solve_with_depth`); with ``"auto"``, only where
    widths alone pay badly (:func:`prunekit.measure.latency_depth.solve_auto`). ``reference``
    and ``scale`` are how those searches call this one (see :func:`_solve`)."""
    if target.depth == "auto" and reference is None:
        from .latency_depth import solve_auto

        return solve_auto(info, target, widths_fn, round_to=round_to, iters=iters)
    if target.depth and reference is None:
        from .latency_depth import solve_with_depth

        return solve_with_depth(info, target, widths_fn, round_to=round_to, iters=iters)
    block = target.block if target.block and target.block > (round_to or 1) else None
    wide = [g.name for g in info.groups if g.size > block] if block else []
    off: float | None = None
    if block and wide:
        sub = info.restricted(wide)
        only = None if widths_fn is None else _keep_only(widths_fn, set(wide))
        try:
            r, widths, frac = _solve(sub, target, only, round_to=block, iters=iters,
                                     reach=target.fraction - target.slack + target.margin,
                                     reference=reference, scale=scale)
        except _OffBlock as e:
            off = e.measured
            if target.progress:
                target.progress(f"latency budget on {target.runtime}: widths in multiples of "
                                f"{block} reach {off:.3f} at the narrowest; searching with "
                                f"round_to {round_to}")
        else:
            target.result["block"] = {"round_to": block, "used": True,
                                      "narrowest": target.result["rounds"][0]["measured_ratio"]}
            return r, {**{g.name: g.size for g in info.groups}, **widths}, frac
    r, widths, frac = _solve(info, target, widths_fn, round_to=round_to, iters=iters,
                             reference=reference, scale=scale)
    target.result["block"] = None if off is None else {"round_to": block, "used": False,
                                                       "narrowest": off}
    return r, widths, frac


def _keep_only(widths_fn: Callable[[float], dict[str, int]], names: set[str]
               ) -> Callable[[float], dict[str, int]]:
    """``widths_fn`` restricted to the groups in ``names`` (its ``keeps_shape`` kept)."""
    from ..engine.budget import keeps_shape

    def fn(r: float) -> dict[str, int]:
        return {g: w for g, w in widths_fn(r).items() if g in names}

    return keeps_shape(fn) if getattr(widths_fn, "keeps_shape", False) else fn


def _solve(info: Any, target: Any, widths_fn: Callable[[float], dict[str, int]] | None,
           *, round_to: int | None, iters: int, reach: float | None = None,
           reference: nn.Module | None = None, scale: float = 1.0
           ) -> tuple[float, dict[str, int], float]:
    """:func:`solve_latency_budget` at one rounding; raises :class:`_OffBlock` where the
    narrowest widths measure above ``reach``. ``reference``: the model the ratios are measured
    against (default ``info.model``), ``scale``: ``info.model``'s ratio to it (a model whose
    residual branches were removed first, :mod:`prunekit.measure.latency_depth`)."""
    from ..engine.budget import (
        apply_plan,
        count_macs_params,
        macs_of_widths,
        round_width,
        round_widths,
        unit_round_to,
        width_plan,
        widths_at_ratio,
    )

    raw = widths_fn or (lambda r: widths_at_ratio(info, r))

    def fn(r: float) -> dict[str, int]:
        return round_widths(info, raw(r), round_to)

    note = target.progress or (lambda _m: None)
    use_model = target.predictor == "model" or (target.predictor == "auto"
                                                and target.batch_size >= MODEL_FROM_BATCH)
    model: CostModel | None = None
    if use_model:  # a large batch: a latency model fitted by measurement (latency_model.py)
        (target.runtime,) = check_runtimes([target.runtime])
        table = model = CostModel(info)  # one image's traffic at any batch (CostModel's batch_size)
        model.scale = scale
        about: dict[str, Any] = {"cached": False, "path": None, "measurements": 0}
        threads = int(target.threads) if target.threads is not None else torch.get_num_threads()
        unit_rt = {g.name: unit_round_to(g, round_to) for g in info.groups}
        least = {g.name: round_width(1, g.size, unit_rt[g.name]) for g in info.groups}
    else:
        table, about = build_table(info, target.runtime, target.batch_size, target.threads,
                                   round_to=round_to, max_seconds=target.table_seconds,
                                   use_cache=target.use_cache, progress=note,
                                   fractions=tuple(target.fractions))
        table.scale = scale
        threads = table.threads
    goal = target.fraction
    t = goal - target.slack / 2  # the middle of the window [goal - slack, goal]
    # what is accepted: the window less a margin at each edge (see LatencyTarget.margin)
    accept_lo, accept_hi = goal - target.slack + target.margin, goal - target.margin
    narrow = fn(0.999)
    floor = table.predict(narrow)
    rounds: list[dict[str, Any]] = []
    tried: dict[tuple, float] = {}
    repeats: dict[str, int] = {}  # per phase, proposals of widths measured before (no new round)
    reference = info.model if reference is None else reference
    base_macs = count_macs_params(reference, info.example_inputs)[0]
    whole = (math.log(scale), scale)  # no channel removed: (log aim, ratio)
    macs_scale = count_macs_params(info.model, info.example_inputs)[0] / base_macs

    def timed(widths: dict[str, int], precision: float | None) -> float:
        """The latency ratio of the model cut to ``widths``, measured end to end."""
        cut = apply_plan(info.model, info.example_inputs, width_plan(info, widths))
        return measure_ratio(cut, reference, info.example_inputs, target.runtime,
                             target.batch_size, threads, max_seconds=target.measure_seconds,
                             precision=precision)[0]

    def measure(widths: dict[str, int], phase: str, **about: float) -> float:
        key = tuple(sorted(widths.items()))
        if key in tried:  # the same widths again (coarse steps): their measurement
            repeats[phase] = repeats.get(phase, 0) + 1
            return tried[key]
        pred = table.predict(widths)
        note(f"latency budget on {target.runtime}: measuring widths predicted at {pred:.3f}")
        measured = timed(widths, target.measure_precision)
        rounds.append({"phase": phase, **about, "predicted_ratio": pred,
                       "measured_ratio": measured, "macs_fraction": macs_kept(widths),
                       "widths": widths})
        tried[key] = measured
        if model is not None:  # every measurement refits the model
            model.fit([(rec["widths"], rec["measured_ratio"]) for rec in rounds])
        return measured

    def known(widths: dict[str, int]) -> bool:
        return tuple(sorted(widths.items())) in tried

    def macs_kept(widths: dict[str, int]) -> float:
        if model is not None:
            return model.features(widths)[0] * macs_scale
        return macs_of_widths(info, widths) / base_macs

    def inside(m: float) -> bool:
        return accept_lo <= m <= accept_hi

    def knob_of(rec: dict[str, Any]) -> float:
        """The method's knob of a measured round (a table round: the one its aim allocated)."""
        return rec["knob"] if "knob" in rec else _allocate(table, fn, rec["aim"], round_to, iters)[0]

    # the narrowest widths, measured: a target below them cannot be reached on this runtime
    m_floor = measure(narrow, "narrowest", knob=0.999)
    if reach is not None and m_floor > reach:
        raise _OffBlock(m_floor)
    if m_floor > goal:
        err = ConfigError(f"target latency {goal:.3f} is below what pruning can reach on "
                          f"{target.runtime} for this model (measured {m_floor:.3f} at "
                          "the narrowest widths)")
        err.measured = m_floor  # type: ignore[attr-defined]  # read by latency_depth.solve_auto
        raise err
    if model is not None:
        # two more points to fit the model, of different shapes: the method's widths at knob
        # 0.5 (MACs fall about as the square of the memory traffic), and widths cut where the
        # memory traffic falls most (the MACs much less)
        # (a method with an allocation of its own: its widths at knobs 0.5 and 0.25)
        measure(fn(0.5), "calibrate", knob=0.5)
        if getattr(widths_fn, "keeps_shape", False):
            measure(fn(0.25), "calibrate", knob=0.25)
        else:
            model.alpha, model.beta = 0.0, 1.0
            memory_cut = cut_down(model, least, 0.5, unit_rt)
            measure(memory_cut, "calibrate", knob=_channels_cut(memory_cut, model.sizes))
        floor = model.predict(narrow)
    log_floor = math.log(max(floor, 1e-6))

    def search() -> None:
        """Phases (a)-(c) until a measurement lands in the window. Widths measured before
        (a search resumed after a failed confirmation) return their latest value, so the
        resumed search moves on from what has been learnt."""
        # (a) the table's allocation; its predicted budget (log scale) corrected by measurement.
        # With the latency model: widths cut where the model says they save the most time
        # per (log) fraction of a group, the model refitted after every measurement
        if model is not None:
            # two shapes, each searched to the window: the model's own allocation, and the
            # method's widths moved by its knob (a method with an allocation of its own -
            # global ranking, damage-optimal - only the latter). The model errs by shape where
            # the runtime runs some layers faster per MAC than others (ResNet-18, batch 64:
            # the model's allocation measured 0.40 where it predicted 0.33, the uniform widths
            # as predicted; MobileNetV2, batch 64, ONNX Runtime: 0.42 and 0.59 for one
            # prediction), so both shapes are searched to the window and compared there, by
            # the MACs they keep (_best): compared at one aim, the one measured slower looks
            # the more efficient. The one that keeps more MACs per measured millisecond at the
            # first aim is searched first.
            def knob_cut(v: float) -> dict[str, int]:
                return _allocate(model, fn, math.exp(v), round_to, iters)[1]

            def own_cut(v: float) -> dict[str, int]:
                return fill_back(model, cut_down(model, least, math.exp(v), unit_rt), math.exp(v), round_to)

            def phase_of(shape: Callable[[float], dict[str, int]]) -> str:
                return "model" if shape is own_cut else "model-knob"

            shapes = [knob_cut] if getattr(widths_fn, "keeps_shape", False) else [own_cut, knob_cut]
            v0 = math.log(t)
            # each shape's measured (log aim, ratio) points, the floor and the original first
            points = {shape: [(log_floor, m_floor), whole] for shape in shapes}

            def search_shape(shape: Callable[[float], dict[str, int]], first: float | None,
                             phase: str) -> bool:
                return _regula_falsi(
                    shape, first, points[shape], t, inside, target.table_rounds,
                    lambda w, v: measure(w, phase, aim=math.exp(v),
                                         knob=_channels_cut(w, model.sizes)), known)

            if len(shapes) > 1 and target.table_rounds > 1:
                effs = []
                for shape in shapes:
                    w = shape(v0)
                    m = measure(w, phase_of(shape), aim=t, knob=_channels_cut(w, model.sizes))
                    effs.append(macs_kept(w) / max(m, 1e-9))
                if effs[1] > effs[0]:
                    shapes.reverse()
            found = False
            for shape in shapes:
                found = search_shape(shape, v0, phase_of(shape)) or found
            # A shape that missed the window in its rounds (a measurement or two that ran
            # fast or slow: MobileNetV2 at batch 64 on ONNX Runtime, its own allocation at
            # 0.434 and 0.453 for a window from 0.46) while keeping clearly more MACs per
            # measured millisecond near it than the candidate the other shape landed: searched
            # on from its measured points, once (phase "<shape> again"). Where that misses
            # too (MobileNetV2 at batch 64 on OpenVINO: its own allocation measured 0.283,
            # then 0.342 and 0.348 for a window of 0.31-0.34, and searched on it proposed only
            # widths already measured), its widest widths measured under the window are
            # widened group by group (phase "<shape> widened"), as phase (c) does.
            best = _best(rounds, accept_lo, accept_hi, goal)
            if found and inside(best["measured_ratio"]):
                near = accept_lo - target.slack
                bar = SHAPE_GAIN * best["macs_fraction"] / best["measured_ratio"]
                for shape in (sh for sh in shapes if phase_of(sh) != best["phase"]):
                    phase = phase_of(shape)
                    mine = [rec for rec in rounds if rec["phase"] == phase]
                    if not any(rec["macs_fraction"] / rec["measured_ratio"] > bar for rec in mine
                               if near <= rec["measured_ratio"] <= goal):
                        continue
                    if search_shape(shape, None, f"{phase} again"):
                        continue
                    under = [rec for rec in rounds if rec["phase"] in (phase, f"{phase} again")
                             and near <= rec["measured_ratio"] < accept_lo]
                    if under and target.refine_rounds > 0:
                        widen(max(under, key=lambda rec: rec["measured_ratio"]),
                              f"{phase} widened", target.refine_rounds)
        else:
            found = _regula_falsi(
                lambda v: _allocate(table, fn, math.exp(v), round_to, iters)[1],
                math.log(min(max(goal, floor), 0.999)), [(log_floor, m_floor), whole], t,
                inside, target.table_rounds, lambda w, v: measure(w, "table", aim=math.exp(v)),
                known)
        # (b) where the table errs beyond that (runtimes that fuse or pad some layers), the
        # method's own widths, their knob searched by measurement alone (latency falls about
        # as the MACs, with the square of the widths kept: the first guess). The narrowest
        # widths inside the window do not end the search: wider ones may be too.
        if not found:
            found = _regula_falsi(lambda v: fn(min(1.0 - v, 0.999)), math.sqrt(t),
                                  [(0.001, m_floor), (1.0, scale)], t, inside, target.max_rounds,
                                  lambda w, v: measure(w, "knob", knob=1.0 - v), known)
        # (c) the method's widths move all groups at once, in round_to steps: on a small model
        # no knob value may fall in the window. From the widest widths measured under it,
        # single groups are widened step by step where the table says it costs least
        # (fill_back), the aim set from that candidate's measurement and corrected by each new
        # one (NetAdapt's one-layer-at-a-time steps, measured).
        # The narrowest widths are the last resort: measured inside the window with nothing
        # wider there, they are widened too (near a small model's floor one model's
        # measurements spread as wide as the window)
        wider_inside = any(inside(rec["measured_ratio"]) and rec["phase"] != "narrowest"
                           for rec in rounds)
        under = [rec for rec in rounds if rec["measured_ratio"] < accept_lo
                 or (rec["phase"] == "narrowest" and inside(rec["measured_ratio"]))]
        if not (found or wider_inside) and target.refine_rounds > 0 and under:
            widen(max(under, key=lambda rec: rec["measured_ratio"]), "refine", target.refine_rounds)

    def widen(lo: dict[str, Any], phase: str, n: int) -> bool:
        """Widen the widths of round ``lo`` (measured under the window) one group step at a
        time where the table (or latency model) says it costs least (:func:`fill_back`), the
        aim set from ``lo``'s measurement and corrected by each new one; ``n`` rounds at most."""
        start, m_lo = dict(lo["widths"]), lo["measured_ratio"]
        log_p = math.log(max(table.predict(start), 1e-6))
        knob = knob_of(lo)
        return _regula_falsi(
            lambda v: fill_back(table, start, math.exp(v), round_to),
            min(log_p + math.log(t / max(m_lo, 1e-6)), whole[0] - 1e-3), [(log_p, m_lo), whole], t,
            inside, n, lambda w, v: measure(w, phase, aim=math.exp(v), knob=knob), known)

    # The best candidate (_best) is measured again in fresh sessions: one compiled instance
    # of a model can run a few percent faster than the next. Only the fresh sessions judge
    # it: the measurement that made it a candidate was picked for landing in the window, so
    # it is biased towards the window (the winner's curse), and the median of the fresh
    # sessions is robust to one session that runs far off (a ResNet-20 on ONNX Runtime
    # re-timed 0.61, 0.71, 0.71). A candidate whose confirmation leaves the window sends the
    # search on from there (its confirmed value now stands for it); one under the window
    # stays the fallback.
    def confirm(best: dict[str, Any]) -> None:
        note(f"latency budget on {target.runtime}: measuring the widths measured at "
             f"{best['measured_ratio']:.3f} again ({target.confirm_sessions} x fresh sessions)")
        again = sorted(timed(best["widths"], target.confirm_precision)
                       for _ in range(max(1, target.confirm_sessions)))
        median = statistics.median(again)
        best["search_ratio"] = best["measured_ratio"]
        best["sessions"] = again
        best["confirmed_ratio"] = best["measured_ratio"] = median
        tried[tuple(sorted(best["widths"].items()))] = median

    def outshone(pending: list[dict[str, Any]]) -> bool:
        """Whether a candidate that failed its confirmation near the window kept clearly more
        MACs per measured millisecond (``SHAPE_GAIN``) than every candidate still waiting to
        be confirmed: then the search goes on from what it has measured rather than accept
        much less (a candidate of the model's own allocation can land in the window once and
        re-time just outside it in fresh sessions; the method's uniform widths, keeping far
        fewer MACs, were then confirmed instead: MobileNetV2 at batch 64 kept 0.43-0.54 of
        the MACs where the model's allocation kept 0.63-0.78 near the window)."""
        failed = [rec for rec in rounds if "confirmed_ratio" in rec
                  and accept_lo - target.slack <= rec["measured_ratio"] <= goal + target.slack]
        return bool(failed) and max(rec["macs_fraction"] / rec["measured_ratio"] for rec in failed) \
            > SHAPE_GAIN * max(rec["macs_fraction"] / rec["measured_ratio"] for rec in pending)

    for attempt in range(max(1, target.confirmations)):
        pending = [rec for rec in rounds
                   if inside(rec["measured_ratio"]) and "confirmed_ratio" not in rec]
        if attempt == 0 or not pending or outshone(pending):
            search()
        best = _best(rounds, accept_lo, accept_hi, goal)
        if best["measured_ratio"] > goal or "confirmed_ratio" in best or target.confirmations < 1:
            break
        confirm(best)
        if inside(best["measured_ratio"]):
            break
    # the search spent: the widest candidates measured within the goal, each confirmed in turn
    for _ in range(target.confirmations):
        best = _best(rounds, accept_lo, accept_hi, goal)
        if best["measured_ratio"] > goal or "confirmed_ratio" in best:
            break
        confirm(best)
    best = _best(rounds, accept_lo, accept_hi, goal)
    widths, pred, measured = best["widths"], best["predicted_ratio"], best["measured_ratio"]
    r = knob_of(best)
    for rec in rounds:
        rec.pop("widths")
    frac = macs_of_widths(info, widths) / base_macs
    target.result.update({
        "target_latency": goal, "runtime": target.runtime, "batch_size": target.batch_size,
        "threads": threads, "predicted_ratio": pred, "measured_ratio": measured,
        "confirmed_ratio": best.get("confirmed_ratio"),
        "reached": measured <= goal, "rounds": rounds, "repeats": repeats,
        "predictor": "model" if model is not None else "table",
        "table": {**about, "seconds": getattr(table, "seconds", 0.0),
                  "base_ms": getattr(table, "base_ms", None),
                  **({"fit": model.to_json()} if model is not None else {})},
        "macs_fraction": frac})
    return r, widths, frac


def _channels_cut(widths: dict[str, int], sizes: dict[str, int]) -> float:
    """The fraction of all groups' channels removed (the knob reported for a model round)."""
    total = sum(sizes.values())
    return 1.0 - sum(min(widths.get(g, s), s) for g, s in sizes.items()) / max(total, 1)


def _regula_falsi(widths_of: Callable[[float], dict[str, int]], first: float | None,
                  points: list[tuple[float, float]], t: float, inside: Callable[[float], bool],
                  rounds: int, measure: Callable[[dict[str, int], float], float],
                  known: Callable[[dict[str, int]], bool] = lambda _w: False) -> bool:
    """Search a scalar ``v`` (measured latency rising with it) for widths measured ``inside``
    the window around ``t``: each round interpolates ``v`` between the measured ``(v, ratio)``
    points that bracket ``t`` (regula falsi, kept inside the bracket), starting from ``first``
    (``None``: interpolated from ``points`` too). Each measurement is appended to ``points``.

    ``rounds`` counts new measurements: widths ``known`` to have been measured already (coarse
    steps: ``v`` moved less than one group step) cost no round, their value narrows the
    bracket, and the next ``v`` is tried, ``REPEATS`` x ``rounds`` proposals at most.
    Returns whether the window was reached."""
    v = _interpolate(points, t) if first is None else first
    proposals = REPEATS * rounds
    while rounds > 0 and proposals > 0:
        proposals -= 1
        widths = widths_of(v)
        rounds -= 0 if known(widths) else 1
        m = measure(widths, v)
        points.append((v, m))
        if inside(m):
            return True
        v = _interpolate(points, t)
    return False


def _interpolate(points: list[tuple[float, float]], t: float) -> float:
    """The next ``v`` of :func:`_regula_falsi`: between the points that bracket ``t``, kept
    a tenth of the bracket from either end."""
    lo, hi = _bracket(points, t)
    w = (t - lo[1]) / (hi[1] - lo[1]) if hi[1] - lo[1] > 1e-9 else 0.5
    return lo[0] + min(max(w, 0.1), 0.9) * (hi[0] - lo[0])


def _bracket(points: list[tuple[float, float]], t: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The measured ``(v, ratio)`` points around ``t``: the largest ``v`` measured at or under
    ``t``, and the smallest ``v`` above it measured over ``t``."""
    under = [p for p in points if p[1] <= t]
    lo = max(under, key=lambda p: p[0]) if under else min(points, key=lambda p: p[1])
    over = [p for p in points if p[1] > t and p[0] > lo[0]]
    hi = min(over, key=lambda p: p[0]) if over else max(points, key=lambda p: p[0])
    return lo, hi


def _best(rounds: list[dict[str, Any]], lo: float, hi: float, goal: float) -> dict[str, Any]:
    """Of the candidates measured in ``[lo, hi]`` (the window less its margins), the one that
    keeps the most MACs (their latencies differ by the noise; their shapes may not); else the
    slowest measured within the goal; else the fastest measured."""
    window = [rec for rec in rounds if lo <= rec["measured_ratio"] <= hi]
    if window:
        return max(window, key=lambda rec: (rec["macs_fraction"], rec["measured_ratio"]))
    within = [rec for rec in rounds if rec["measured_ratio"] <= goal]
    if within:
        return max(within, key=lambda rec: rec["measured_ratio"])
    return min(rounds, key=lambda rec: rec["measured_ratio"])


def _allocate(table: Any, fn: Callable[[float], dict[str, int]], aim: float,
              round_to: int | None, iters: int) -> tuple[float, dict[str, int]]:
    """Least knob ``r`` whose widths ``fn(r)`` the table predicts within ``aim`` (bisection),
    then :func:`fill_back`."""
    lo, hi = 0.0, 0.999
    r, widths = hi, fn(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        w = fn(mid)
        if table.predict(w) <= aim:
            hi, r, widths = mid, mid, w
        else:
            lo = mid
    return r, fill_back(table, widths, aim, round_to)


def fill_back(table: Any, widths: dict[str, int], aim: float,
              round_to: int | None) -> dict[str, int]:
    """Give channels back while the predicted ratio stays within ``aim``: each step widens the
    group whose next step (``round_to`` channels, or one) costs the least predicted latency per
    fraction of the group regained (a greedy knapsack over the table, as in HALP; ``table``: a
    :class:`LatencyTable` or a :class:`~prunekit.measure.latency_model.CostModel`), so the
    budget is used, not overshot by the coarse steps of a uniform ratio."""
    step = round_to or 1
    widths = dict(widths)
    current = table.predict(widths)
    while True:
        best: tuple[float, str, int, float] | None = None
        for g, w in widths.items():
            size = table.sizes.get(g, w)
            if w >= size:
                continue
            nw = min(size, w + step)
            pred = table.step_ratio(widths, current, g, nw)
            if pred > aim:
                continue
            cost = (pred - current) / ((nw - w) / size)
            if best is None or cost < best[0]:
                best = (cost, g, nw, pred)
        if best is None:
            return widths
        _, g, nw, current = best
        widths[g] = nw


def groups_summary(table: LatencyTable, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The table as plain data (for reports)."""
    names = list(names or table.ratios)
    return {g: {str(w): round(r, 4) for w, r in sorted(table.ratios.get(g, {}).items())} for g in names}
