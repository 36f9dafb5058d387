"""How much of the MACs can a width allocation keep at a measured latency? (issue #18, efficiency)

``bench/runtimes.py`` reports the efficiency of a ``--target-latency`` result, MACs ratio over
latency ratio, against a goal of 0.9 at batch 64. This script asks how high that can go on this
machine for width pruning at all, by measuring allocation shapes end to end at several
latency levels:

* ``prunekit``: the allocation of the latency model (``cut_down``: the most predicted time
  saved per unit of MACs-weighted log width, so no group is cut to nothing where many can give
  a little), the memory traffic counted for the whole batch (``CostModel(batch_size=64)``);
* ``prunekit, per-image traffic``: the same with one image's activations counted beside the
  parameters, as ``--target-latency`` counts them at every batch size (the whole batch's count
  was tried in session 16 and measured no better);
* ``max-macs``: a greedy that keeps the most MACs under the same predicted latency: each
  ``round_to`` step cuts the group that saves the most predicted time per MAC removed, with no
  regard for how narrow any group gets (on a memory-bound network it empties the
  high-resolution layers first). Not an allocation to deploy: a measured estimate of the
  efficiency the latency model allows at all.
* ``random`` (``--random N``, none by default): N allocations drawn at random around uniform
  widths (a base fraction from 0.1 to 1, each group's fraction that times 0.5-1.5), free of any
  latency model. Their frontier at a latency is the most MACs any of them kept measured at or
  under it (an envelope, not an interpolation), as is the row ``any`` over every allocation
  measured: what the model-free sample says a width allocation can keep at that latency.
* ``random, block B`` (``--random N --block B``): N more, drawn the same way on the runtime's
  channel block (every width a multiple of ``B``, groups of at most ``B`` channels whole), as
  ``--target-latency`` tries them first (:func:`prunekit.measure.runtimes.channel_block`).

Each latency model (:class:`~prunekit.measure.latency_model.CostModel`) is fitted as the
search fits it: to the narrowest widths, the uniform widths at knob 0.5 and the widths that
cut memory traffic most, each measured end to end. Every allocation is then pruned, exported
and timed against the original interleaved (median per-round ratio, timed until its standard
error is at most ``--precision`` or 30 s), one thread; the shapes are measured aim by aim, in
turn. From each shape's measured points the MACs kept at latency 0.7 / 0.5 / 0.35 is
interpolated (log-linear between the two measured points around it), and efficiency = that /
the latency.

Results: bench/results/efficiency_frontier.{json,md} (the frontier) and
efficiency_frontier_points.{json,md} (every allocation measured).

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/efficiency_frontier.py   # ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402
from runtimes import MODELS  # noqa: E402

from prunekit.engine import analyse  # noqa: E402
from prunekit.engine.budget import (  # noqa: E402
    apply_plan,
    count_macs_params,
    round_width,
    round_widths,
    unit_round_to,
    width_plan,
    widths_at_ratio,
)
from prunekit.measure.latency_model import CostModel, cut_down  # noqa: E402
from prunekit.measure.latency_table import measure_ratio  # noqa: E402

ROUND_TO = 8


def max_macs_cut(model: CostModel, floor: dict[str, int], aim: float,
                 round_to: dict[str, int | None]) -> dict[str, int]:
    """Widths predicted within ``aim`` that keep the most MACs: greedy, one ``round_to`` step at
    a time, the step with the most predicted latency saved per MAC removed."""
    widths, current, macs = dict(model.sizes), 1.0, 1.0
    while current > aim:
        best = None
        for g, w in widths.items():
            nw = round_width(w - 1, model.sizes[g], round_to.get(g)) if w > 1 else w
            if nw >= w or nw < floor.get(g, 1):
                continue
            pred = model.step_ratio(widths, current, g, nw)
            m = model.features({**widths, g: nw})[0]
            gain = (current - pred) / max(macs - m, 1e-12)
            if best is None or gain > best[0]:
                best = (gain, g, nw, pred, m)
        if best is None:
            break
        _, g, nw, current, macs = best
        widths[g] = nw
    return widths


def steps(info) -> tuple[dict[str, int | None], dict[str, int]]:
    """Each group's ``round_to`` step in units and its narrowest width."""
    unit_rt = {g.name: unit_round_to(g, ROUND_TO) for g in info.groups}
    return unit_rt, {g.name: round_width(1, g.size, unit_rt[g.name]) for g in info.groups}


def calibrate(info, model: CostModel, measure: Callable[[dict[str, int]], float]) -> None:
    """Fit ``model`` as the ``--target-latency`` search does
    (:func:`prunekit.measure.latency_table.solve_latency_budget`): to the measured latency
    ratios (``measure(widths)``) of the narrowest widths, the uniform widths at knob 0.5 and
    the widths that cut the memory traffic most."""
    unit_rt, least = steps(info)
    calib = [round_widths(info, widths_at_ratio(info, k), ROUND_TO) for k in (0.999, 0.5)]
    model.alpha, model.beta = 0.0, 1.0
    calib.append(cut_down(model, least, 0.5, unit_rt))
    model.fit([(w, measure(w)) for w in calib])


def frontier_at(points: list[tuple[float, float]], r: float) -> float | None:
    """MACs kept at latency ``r`` from the measured ``(latency, macs)`` points around it,
    log-linear between them (a power law through both; a straight line would overstate the
    MACs, which fall faster than the latency). None outside their range."""
    pts = sorted(points)
    for (r0, m0), (r1, m1) in zip(pts, pts[1:], strict=False):
        if r0 <= r <= r1:
            if r1 == r0:
                return m0
            t = (math.log(r) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0)))
    return None


def frontier(rows: list[dict], levels: list[float]) -> list[dict]:
    """Each model, runtime and shape's MACs kept and efficiency at ``levels``."""
    out = []
    keys = dict.fromkeys((r["model"], r["runtime"], r["batch"], r["shape"]) for r in rows
                         if not r["shape"].startswith("calibrate"))
    if any(r["shape"].startswith("random") for r in rows):
        keys.update(dict.fromkeys((m, rt, b, "any") for m, rt, b, _ in keys))
    for model, rt, batch, shape in keys:
        mine = [r for r in rows if (r["model"], r["runtime"], r["batch"]) == (model, rt, batch)
                and shape in (r["shape"], "any")]
        pts = [(1.0, 1.0)] + [(r["latency_ratio"], r["macs_ratio"]) for r in mine]
        sampled = shape.startswith("random") or shape == "any"  # no model: an envelope
        fit = {} if sampled else mine[0].get("fit", {})
        for lv in levels:
            m = envelope_at(pts, lv) if sampled else frontier_at(pts, lv)
            out.append({"model": model, "runtime": rt, "batch": batch, "shape": shape,
                        "latency": lv, "macs_kept": m, "efficiency": None if m is None else m / lv,
                        **fit})
    return out


def envelope_at(points: list[tuple[float, float]], r: float) -> float | None:
    """The most MACs kept by any of the measured ``(latency, macs)`` points at or under latency
    ``r``; None where none was measured there."""
    kept = [m for lat, m in points if lat <= r]
    return max(kept) if kept else None


def random_widths(info, rng: random.Random, unit_rt: dict[str, int | None],
                  least: dict[str, int], block: int = 0) -> dict[str, int]:
    """Widths drawn around uniform ones: a base kept fraction from 0.1 to 1, each group's that
    times 0.5-1.5 (at most 1), rounded like the budget and at least the group's narrowest;
    with ``block``, rounded to multiples of it instead, groups of at most ``block`` whole."""
    base = rng.uniform(0.1, 1.0)
    out = {}
    for g in info.groups:
        w = max(1, round(g.size * min(1.0, base * rng.uniform(0.5, 1.5))))
        if not block:
            out[g.name] = max(least[g.name], round_width(w, g.size, unit_rt[g.name]))
        elif g.size <= block:
            out[g.name] = g.size
        else:
            unit = unit_round_to(g, block)
            out[g.name] = max(unit, round_width(w, g.size, unit))
    return out


def shapes_measured(name: str, rt: str, args: argparse.Namespace, t_start: float
                    ) -> list[dict]:
    """Calibrate the latency models of ``name`` on ``rt``, then measure every shape at every
    aim (shapes interleaved, aim by aim); returns the measured rows."""
    build, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    net = build()
    x = torch.randn(1, *shape)
    info = analyse(net, x)
    base_macs = count_macs_params(net, x)[0]
    unit_rt, least = steps(info)
    models = {"batch": CostModel(info, batch_size=args.batch), "per-image": CostModel(info)}
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}

    def measure(widths: dict[str, int], shape_name: str, aim: float | None, cm: CostModel) -> float:
        key = tuple(sorted(widths.items()))
        if key in seen:  # widths measured before (the calibrations share two; shapes may agree)
            if not shape_name.startswith("calibrate"):
                rows.append({**seen[key], "shape": shape_name, "aim": aim,
                             "predicted": cm.predict(widths), "same_widths_as": seen[key]["shape"]})
            return seen[key]["latency_ratio"]
        pruned = apply_plan(net, x, width_plan(info, widths))
        ratio = measure_ratio(pruned, net, x, rt, args.batch, 1, max_seconds=1.0,
                              precision=args.precision)[0]
        macs = count_macs_params(pruned, x)[0] / base_macs
        fracs = [widths[g] / s for g, s in cm.sizes.items()]
        seen[key] = {"model": name, "runtime": rt, "batch": args.batch, "shape": shape_name,
                     "aim": aim, "predicted": cm.predict(widths), "latency_ratio": ratio,
                     "macs_ratio": macs, "efficiency": macs / ratio,
                     "narrowest_group": min(fracs), "first_group": fracs[0]}
        rows.append(seen[key])
        print(f"[{time.perf_counter() - t_start:.0f} s] {name} {rt} {shape_name} aim {aim}: "
              f"latency {ratio:.3f}, MACs {macs:.3f}", flush=True)
        return ratio

    for kind, cm in models.items():
        calibrate(info, cm, lambda w, cm=cm, kind=kind: measure(w, f"calibrate ({kind})", None, cm))
    batch, per_image = models["batch"], models["per-image"]
    shapes = {
        "prunekit": (batch, lambda a: cut_down(batch, least, a, unit_rt)),
        "prunekit, per-image traffic": (per_image, lambda a: cut_down(per_image, least, a, unit_rt)),
        "max-macs": (batch, lambda a: max_macs_cut(batch, least, a, unit_rt)),
    }
    for aim in map(float, args.aims.split(",")):
        for shape_name, (cm, cut) in shapes.items():
            measure(cut(aim), shape_name, aim, cm)
    rng = random.Random(0)
    for _ in range(args.random):
        measure(random_widths(info, rng, unit_rt, least), "random", None, batch)
    for _ in range(args.random if args.block else 0):
        measure(random_widths(info, rng, unit_rt, least, args.block),
                f"random, block {args.block}", None, batch)
    for row in rows:
        cm = per_image if "per-image" in row["shape"] else batch
        row["fit"] = {"alpha": cm.alpha, "beta": cm.beta}
    return rows


def write_summary(args: argparse.Namespace, rows: list[dict], levels: list[float],
                  payload: dict, command: str) -> None:
    """bench/results/<name>.{json,md}: the frontier of the measured ``rows``."""
    write_results(args.name, {k: v for k, v in payload.items() if k in ("settings", "wall_s")},
                  frontier(rows, levels),
                  ["model", "runtime", "batch", "shape", "latency", "macs_kept", "efficiency",
                   "alpha", "beta"],
                  "MACs kept at a measured latency: prunekit's allocation vs a MACs-greedy one",
                  notes="macs_kept: the MACs ratio at that latency ratio, log-linear between the "
                        "two measured points of the shape around it (efficiency_frontier_points.md: "
                        "each allocation's predicted and measured latency ratio, MACs ratio, "
                        "narrowest group's and first group's kept fraction); efficiency = "
                        "macs_kept / latency; alpha, beta: the latency model's fit "
                        f"(latency_model.py). Command: {command}.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobilenetv2,resnet18")
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--aims", default="0.8,0.6,0.45,0.33,0.25",
                   help="predicted latency ratios each shape is cut to")
    p.add_argument("--levels", default="0.7,0.5,0.35", help="latencies the frontier is read at")
    p.add_argument("--precision", type=float, default=0.01)
    p.add_argument("--random", type=int, default=0,
                   help="allocations drawn at random around uniform widths, also measured")
    p.add_argument("--block", type=int, default=0,
                   help="with --random: as many allocations again, on this channel block")
    p.add_argument("--name", default="efficiency_frontier")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the frontier from <name>_points.json, measuring nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    levels = [float(v) for v in args.levels.split(",")]
    t_start = time.perf_counter()
    measured_with = " ".join(a for a in sys.argv[1:] if a != "--report-only")  # the measuring run's
    command = f"`OMP_NUM_THREADS=1 .venv/bin/python bench/efficiency_frontier.py {measured_with}`"
    points = RESULTS / f"{args.name}_points.json"
    if args.report_only:
        measured = json.loads(points.read_text())
        write_summary(args, measured["rows"], levels, measured, command)
        return
    rows: list[dict] = []
    for name in args.models.split(","):
        for rt in args.runtimes.split(","):
            rows += shapes_measured(name, rt, args, t_start)
            payload = {"settings": {**vars(args), "threads": 1, "round_to": ROUND_TO},
                       "wall_s": time.perf_counter() - t_start}
            write_results(f"{args.name}_points", payload, rows,
                          ["model", "runtime", "batch", "shape", "aim", "predicted", "latency_ratio",
                           "macs_ratio", "efficiency", "narrowest_group", "first_group"],
                          "Allocations measured for the efficiency frontier",
                          notes="aim and predicted: the latency model's ratio; latency_ratio: "
                                "measured end to end (median per-round ratio); narrowest_group / "
                                "first_group: the kept fraction of the narrowest group and of the "
                                f"stem's group. Command: {command}.")
            write_summary(args, rows, levels, payload, command)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
