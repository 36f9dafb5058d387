"""A latency budget met partly by removing residual branches whole (``--depth``).

Width pruning cannot take a small network far down in latency at a good price: its narrow
layers run at a fraction of the runtime's speed per multiply-accumulate, and every layer keeps
a fixed cost. A ResNet-20 at 28x28, batch 64, on OpenVINO kept 0.64 of its MACs per unit of
latency at half its latency by widths alone, and 1.02 with up to two blocks of each stage
removed (``bench/results/runtimes_session20_resnet20_depth2.md``, ``docs/runtimes.md``).
Removing a branch keeps the other layers at full width, where the runtime is fastest; what it
costs in accuracy is the branch's whole contribution, which residual networks can spare for
many of their blocks [1]_.

The search, after NetAdapt's measured steps and HALP's latency-saliency knapsack [2]_ [3]_:

1. **Damage**: for every branch that can vanish
   (:func:`~prunekit.engine.depth.vanishable`), the change of the model's output on the
   calibration images when that branch alone is removed, relative to the output's energy.
2. **Saving**: the model with that branch alone removed, timed on the runtime against the
   original (the latency ratio it keeps).
3. **Order and count**: branches in increasing damage per unit of latency saved, at most
   ``depth`` of each stage's (residual stream's) and never all of them; the most of them whose
   predicted ratio (one less the sum of their single savings: a ResNet-20 with five branches
   removed measured 0.429 on OpenVINO at batch 64 where the sum predicted 0.433,
   ``runtimes_session20_resnet20_depth_all``) stays at or above the middle of the window.
   The model with those removed is measured. Where it measures under the window (on ONNX
   Runtime the sum errs high: all nine predicted 0.658, measured 0.276), the savings are
   scaled by what that measurement saved over what their sum said, and the most branches that
   this scaled sum keeps at or above the middle (else the bottom) of the window are measured
   next, always fewer than the last count measured under it.
4. **Widths**: when that model is above the window, the widths of the rest are searched as
   without ``--depth`` (:func:`~prunekit.measure.latency_table.solve_latency_budget`), every
   ratio still measured against the original; when it is inside the window, it is measured
   again in fresh sessions and kept if it stays there.

**Automatic depth** (``depth="auto"``, the default of a latency budget; :func:`solve_auto`):
the widths are searched alone first. Where they keep less than ``AUTO_BELOW`` of the MACs per
unit of latency kept (the fixed cost of every layer dominates, as on ResNet-20 at 28x28 at half
its latency), or cannot reach the budget, the search runs again with up to one branch per stage
removed, and that model is kept only where it keeps ``AUTO_GAIN`` times the MACs of the widths
alone, both measured within the budget. Measured on ResNet-20, Fashion-MNIST, batch 64, after
the same fine-tuning (``bench/results/latency_accuracy_05_auto.md``,
``latency_accuracy_035_ov_auto.md``, ``latency_accuracy_07.md``, ``docs/runtimes.md``): at half
the latency on ONNX Runtime the widths alone kept 0.36 of the MACs per unit of latency (they
reached 87.76 % in session 21), one branch per stage removed kept 1.38x their MACs and reached
89.46 %, where the uniform widths measured just slower reached 88.61 %; at 0.35 on OpenVINO
88.86 % against 87.02 % (uniform, slower); at 0.7 the widths kept 0.80 (no branch tried) and
reached 91.72 %, one branch per stage 91.34 %. Two branches per stage kept more MACs still at
0.5 (0.264 against 0.236) but reached 79.5 %, so the automatic search stops at one.

References
----------
.. [1] A. Veit, M. Wilber, S. Belongie, "Residual Networks Behave Like Ensembles of Relatively
   Shallow Networks", NeurIPS 2016.
.. [2] T.-J. Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
   Applications", ECCV 2018.
.. [3] M. Shen et al., "Structural Pruning via Latency-Saliency Knapsack" (HALP), NeurIPS 2022.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import eval_mode

__all__ = ["AUTO_BELOW", "AUTO_GAIN", "describe", "solve_auto", "solve_with_depth"]

#: ``depth="auto"`` tries removing branches where widths alone keep less than this fraction of
#: the MACs per unit of latency kept (module docstring)
AUTO_BELOW = 0.75
#: ... and keeps the model with branches removed where it keeps this many times the MACs
AUTO_GAIN = 1.1


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    if isinstance(y, (tuple, list)):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise ConfigError("removing residual branches needs a model whose output is a tensor")
    return y.float()


def _without(info: Any, names: Sequence[str]) -> nn.Module:
    """A copy of ``info.model`` with the branches ``names`` removed whole."""
    from ..engine import GroupPlan, PruningPlan, apply_plan

    sizes = {g.name: g.size for g in info.all_groups}
    return apply_plan(info.model, info.example_inputs,
                      PruningPlan([GroupPlan(n, sizes[n], []) for n in names]))


@torch.no_grad()
def _damage(model: nn.Module, x: torch.Tensor, y0: torch.Tensor, energy: float) -> float:
    """``||f(x) - f_b(x)||^2 / ||f(x)||^2`` (step 1 of the module docstring): ``model`` is
    ``f_b``, the model with one branch removed, ``y0`` is ``f(x)`` and ``energy`` its mean
    square."""
    with eval_mode(model):
        return float(((_output(model, x) - y0) ** 2).mean()) / energy


def _per_stream(info: Any, order: list[str], cap: int) -> list[str]:
    """``order`` kept to at most ``cap`` branches of each residual stream (a stage), and never
    all of them: every stage keeps one branch of its own computation."""
    from ..engine.depth import streams

    stream = streams(info, order)
    left = {s: sum(1 for n in order if stream[n] == s) for s in stream.values()}
    out = []
    taken = dict.fromkeys(left, 0)
    for n in order:
        if left[stream[n]] > 1 and taken[stream[n]] < cap:
            out.append(n)
            left[stream[n]] -= 1
            taken[stream[n]] += 1
    return out


def _same_groups(info: Any, sub: Any) -> dict[str, str]:
    """Group of ``sub`` (the model with branches removed) -> the group of ``info`` with the
    same channels: the one a layer of the same name produces (a residual stream whose first
    producer was a removed branch is named after its next one in ``sub``)."""
    owner = {s.name: g.name for g in info.all_groups for s in g.producers}
    out = {}
    for g in sub.groups:
        found = {owner[s.name] for s in g.producers if s.name in owner}
        if len(found) != 1:
            raise ConfigError(f"group {g.name!r} of the model with branches removed matches "
                              f"{len(found)} groups of the original")
        out[g.name] = found.pop()
    return out


class _DepthSearch:
    """The module docstring's steps on one model and budget; each method is one step."""

    def __init__(self, info: Any, target: Any) -> None:
        from ..engine.budget import count_macs_params

        self.info, self.target = info, target
        self.note = target.progress or (lambda _m: None)
        self.threads = int(target.threads) if target.threads is not None else torch.get_num_threads()
        self.base_macs = count_macs_params(info.model, info.example_inputs)[0]
        goal = target.fraction
        self.middle = goal - target.slack / 2
        self.lo, self.hi = goal - target.slack + target.margin, goal - target.margin
        self.rounds: list[dict[str, Any]] = []

    def timed(self, model: nn.Module, precision: float | None) -> float:
        """``model``'s latency over the original's on the runtime, interleaved."""
        from .latency_table import measure_ratio

        t = self.target
        return measure_ratio(model, self.info.model, self.info.example_inputs, t.runtime,
                             t.batch_size, self.threads, max_seconds=t.measure_seconds,
                             precision=precision)[0]

    def macs_fraction(self, widths: dict[str, int]) -> float:
        """The MACs the original keeps with ``widths`` (0: a branch removed), as a fraction."""
        from ..engine.budget import macs_of_widths

        return macs_of_widths(self.info, widths) / self.base_macs

    def score_and_time(self, names: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Steps 1 and 2: each branch removed alone, its damage on the calibration images and
        its latency ratio on the runtime."""
        info, t = self.info, self.target
        x = t.calibration if t.calibration is not None else info.example_inputs
        with torch.no_grad(), eval_mode(info.model):
            y0 = _output(info.model, x)
        energy = float((y0 * y0).mean()) or 1.0
        damage, single = {}, {}
        for i, n in enumerate(names):
            if i == 0 or (i + 1) % max(1, len(names) // 4) == 0 or i + 1 == len(names):
                self.note(f"latency budget on {t.runtime}: scoring and timing each branch "
                          f"removed ({i + 1}/{len(names)}, {len(x)} images)")
            cut = _without(info, [n])
            damage[n] = _damage(cut, x, y0, energy)
            single[n] = self.timed(cut, t.measure_precision)
        return damage, single

    def count(self, order: list[str], single: dict[str, float]) -> tuple[int, float, float]:
        """Step 3's count: the most of ``order`` whose predicted ratio stays in the window,
        measured; under the window, the savings scaled by the shortfall and fewer measured.
        Returns ``(k, measured ratio of the first k removed, first prediction)``."""
        saved = [0.0]  # saved[j]: the sum of the single savings of the first j branches
        for n in order:
            saved.append(saved[-1] + 1.0 - single[n])

        def most(bottom: float, scale: float, first: int, last: int) -> int | None:
            """The most branches in [first, last] whose scaled prediction stays >= bottom."""
            fit = [j for j in range(first, last + 1) if 1.0 - scale * saved[j] >= bottom]
            return max(fit) if fit else None

        k = most(self.middle, 1.0, 0, len(order)) or most(self.lo, 1.0, 0, len(order)) or 0
        first = pred = 1.0 - saved[k]
        measured, ok = 1.0, 0  # no branch removed: 1.0, in or over the window
        while k > ok:
            self.note(f"latency budget on {self.target.runtime}: measuring {k} branches removed "
                      f"(predicted {pred:.3f})")
            measured = self.timed(_without(self.info, order[:k]), self.target.measure_precision)
            self.rounds.append({"phase": "depth", "branches": k, "predicted_ratio": pred,
                                "measured_ratio": measured,
                                "macs_fraction": self.macs_fraction({n: 0 for n in order[:k]})})
            if measured >= self.lo:
                ok = k
                break
            # under the window: the savings add up to more than their sum here (ONNX
            # Runtime); scaled by what this measurement saved, the most that stay in it next
            under, scale = k, (1.0 - measured) / max(saved[k], 1e-9)
            k = (most(self.middle, scale, ok + 1, under - 1)
                 or most(self.lo, scale, ok + 1, under - 1)
                 or min(ok + 1, under - 1))  # else one more try, the fewest not yet measured
            pred = 1.0 - scale * saved[k]
        return ok, measured, first

    def confirm(self, vanished: nn.Module, k: int) -> float:
        """The branches alone measured in the window: the median of fresh sessions."""
        t = self.target
        self.note(f"latency budget on {t.runtime}: measuring {k} branches removed again "
                  f"({t.confirm_sessions} x fresh sessions)")
        again = sorted(self.timed(vanished, t.confirm_precision)
                       for _ in range(max(1, t.confirm_sessions)))
        median = statistics.median(again)
        self.rounds[-1].update(search_ratio=self.rounds[-1]["measured_ratio"], sessions=again,
                               confirmed_ratio=median, measured_ratio=median)
        return median

    def widths_rest(self, vanished: nn.Module, measured: float,
                    widths_fn: Callable[[float], dict[str, int]] | None, round_to: int | None,
                    iters: int) -> tuple[float, dict[str, int]]:
        """Step 4: the widths of the model without the branches, searched as without
        ``--depth``, every ratio measured against the original and every prediction scaled by
        ``measured``. Widths are returned by the original's group names."""
        from ..engine import analyse
        from .latency_table import _keep_only, solve_latency_budget

        info = self.info
        ignored = [info.names[m] for m in info.ignored if m in info.names]
        sub = analyse(vanished, info.example_inputs, ignored_layers=ignored,
                      skip_unsupported=info.skip_unsupported)
        names_in = _same_groups(info, sub)  # a group whose first producer went is renamed
        only = None
        if widths_fn is not None:
            kept = _keep_only(widths_fn, set(names_in.values()))

            def only(r: float) -> dict[str, int]:
                w = kept(r)
                return {s: w[o] for s, o in names_in.items() if o in w}

            if getattr(widths_fn, "keeps_shape", False):
                from ..engine.budget import keeps_shape
                keeps_shape(only)
        r, widths, _ = solve_latency_budget(sub, self.target, only, round_to=round_to,
                                            iters=iters, reference=info.model, scale=measured)
        self.target.result["rounds"] = self.rounds + self.target.result.get("rounds", [])
        return r, {names_in[n]: w for n, w in widths.items() if n in names_in}


def solve_with_depth(info: Any, target: Any, widths_fn: Callable[[float], dict[str, int]] | None,
                     *, round_to: int | None, iters: int,
                     alone: tuple[float, dict[str, int], float, dict[str, Any]] | None = None
                     ) -> tuple[float, dict[str, int], float]:
    """The widths of a :class:`~prunekit.engine.budget.LatencyTarget` with ``depth``: the
    module docstring's steps. Widths of removed branches are 0. Fills ``target.result`` as
    :func:`~prunekit.measure.latency_table.solve_latency_budget` does, plus ``depth``:
    ``{candidates, damage, single_ratio, predicted, branches, ratio}``. Returns
    ``(r, widths, macs_fraction)``. ``alone``: the widths-alone search already made
    (:func:`solve_auto`: ``(r, widths, macs_fraction, result)``), returned where no branch
    is removed instead of searching the widths again."""
    from ..engine.depth import vanishable
    from .latency_table import solve_latency_budget

    search = _DepthSearch(info, target)
    names = vanishable(info)
    depth: dict[str, Any] = {"candidates": names}

    def widths_only(why: str) -> tuple[float, dict[str, int], float]:
        if alone is not None:
            target.result.clear()
            target.result.update(alone[3])
            r, w, f = alone[:3]
        else:
            search.note(f"latency budget on {target.runtime}: {why}; searching the widths only")
            r, w, f = solve_latency_budget(info, target, widths_fn, round_to=round_to,
                                           iters=iters, reference=info.model)
        target.result["depth"] = {**depth, "branches": []}
        return r, w, f

    if not names:
        return widths_only("no residual branch can be removed whole")
    damage, single = search.score_and_time(names)  # steps 1 and 2
    order = _per_stream(info, sorted(names, key=lambda n: damage[n] / max(1.0 - single[n], 1e-3)),
                        int(target.depth))  # step 3: the order, then the count
    k, measured, predicted = search.count(order, single)
    depth.update(damage=damage, single_ratio=single, predicted=predicted)
    if k == 0:
        return widths_only("removing the least damaging branch alone measures under the window")
    drop = list(order[:k])
    depth.update(branches=drop, ratio=measured)
    zeros = {n: 0 for n in drop}
    vanished = _without(info, drop)
    if measured <= search.hi:  # the branches alone land in the window: confirmed
        measured = depth["ratio"] = search.confirm(vanished, k)
        if search.lo <= measured <= search.hi:
            widths = {**{g.name: g.size for g in info.groups}, **zeros}
            frac = search.macs_fraction(widths)
            target.result.update({
                "target_latency": target.fraction, "runtime": target.runtime,
                "batch_size": target.batch_size, "threads": search.threads,
                "predicted_ratio": search.rounds[-1]["predicted_ratio"],
                "measured_ratio": measured, "confirmed_ratio": measured,
                "reached": measured <= target.fraction, "rounds": search.rounds, "repeats": {},
                "predictor": "depth", "macs_fraction": frac,
                "table": {"cached": False, "path": None, "measurements": 0, "seconds": 0.0,
                          "base_ms": None},
                "block": None, "depth": depth})
            return 0.0, widths, frac
    r, rest = search.widths_rest(vanished, measured, widths_fn, round_to, iters)  # step 4
    widths = {**{g.name: g.size for g in info.groups}, **rest, **zeros}
    frac = search.macs_fraction(widths)
    target.result.update(macs_fraction=frac, depth=depth)
    return r, widths, frac


def solve_auto(info: Any, target: Any, widths_fn: Callable[[float], dict[str, int]] | None,
               *, round_to: int | None, iters: int) -> tuple[float, dict[str, int], float]:
    """The widths of a :class:`~prunekit.engine.budget.LatencyTarget` with ``depth="auto"``
    (module docstring): the widths alone, then, where they keep less than ``AUTO_BELOW`` of
    the MACs per unit of latency or cannot reach the budget, up to one branch per stage
    removed as :func:`solve_with_depth` does; the latter wins where it keeps ``AUTO_GAIN``
    times the MACs within the budget. ``target.result["depth_auto"]`` tells what was tried
    and why; the rest of ``target.result`` is the winner's."""
    from ..engine.depth import vanishable
    from .latency_table import solve_latency_budget

    def search(depth: int) -> tuple[float, dict[str, int], float, dict[str, Any]]:
        target.depth = depth
        target.result.clear()
        try:
            if depth:  # the widths alone are not searched again where no branch goes
                r, w, f = solve_with_depth(info, target, widths_fn, round_to=round_to,
                                           iters=iters, alone=alone)
            else:
                r, w, f = solve_latency_budget(info, target, widths_fn, round_to=round_to,
                                               iters=iters)
        finally:
            target.depth = "auto"
        return r, w, f, dict(target.result)

    def keep(found: tuple[float, dict[str, int], float, dict[str, Any]], about: dict[str, Any]
             ) -> tuple[float, dict[str, int], float]:
        target.result.clear()
        target.result.update(found[3], depth_auto=about)
        return found[0], found[1], found[2]

    def summary(res: dict[str, Any]) -> dict[str, Any]:
        return {"measured_ratio": res["measured_ratio"], "macs_fraction": res["macs_fraction"],
                "reached": res["reached"],
                **({"branches": res["depth"]["branches"]} if res.get("depth") else {})}

    alone: tuple[float, dict[str, int], float, dict[str, Any]] | None = None
    refused: ConfigError | None = None
    try:
        alone = search(0)
    except ConfigError as e:  # the narrowest widths measure above the budget
        refused = e
    about: dict[str, Any] = {"tried": False}
    if alone is not None:
        res = alone[3]
        eff = res["macs_fraction"] / max(res["measured_ratio"], 1e-9)
        about.update(widths=summary(res), efficiency=eff)
        if res["reached"] and eff >= AUTO_BELOW:
            return keep(alone, {**about, "why": f"widths alone keep {eff:.2f} of the MACs per "
                                f"unit of latency (>= {AUTO_BELOW})"})
    if not vanishable(info):
        if refused is not None:
            raise refused
        return keep(alone, {**about, "why": "no residual branch can be removed whole"})
    why = ("the widths alone cannot reach the budget" if alone is None or not alone[3]["reached"]
           else f"widths alone keep {about['efficiency']:.2f} of the MACs per unit of latency "
           f"(< {AUTO_BELOW})")
    (target.progress or (lambda _m: None))(
        f"latency budget on {target.runtime}: {why}; searching again with up to one residual "
        "branch per stage removed")
    about.update(tried=True, why=why)
    try:
        deep = search(1)
    except ConfigError as e:
        if refused is not None:
            m = getattr(e, "measured", None)
            also = f"{m:.3f}" if m is not None else str(e)
            raise ConfigError(f"{refused}; with one residual branch per stage removed as "
                              f"well: {also}") from None
        return keep(alone, {**about, "chosen": "widths"})
    about["depth"] = summary(deep[3])
    if alone is None:
        return keep(deep, {**about, "chosen": "depth"})
    a, d = alone[3], deep[3]
    wins = d["reached"] and (not a["reached"] or d["macs_fraction"] >= AUTO_GAIN * a["macs_fraction"])
    return keep(deep if wins else alone, {**about, "chosen": "depth" if wins else "widths"})


def describe(result: dict[str, Any]) -> str | None:
    """One line on the residual branches a latency budget's ``result`` removed (and, under
    ``depth="auto"``, why they were tried and what was kept); ``None`` where none were
    considered."""
    gone = (result.get("depth") or {}).get("branches")
    auto = result.get("depth_auto") or {}
    if not (gone or auto.get("tried")):
        return None
    line = f"residual branches removed whole: {', '.join(gone or []) or 'none'}"
    if auto.get("tried"):
        kept = "the branches" if auto.get("chosen") == "depth" else "the widths alone"
        line += f" (one branch per stage tried, as {auto['why']}; kept: {kept})"
    return line
