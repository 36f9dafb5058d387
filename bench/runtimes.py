"""Speed on the deployment runtime: uniform 50% of the MACs vs ``--target-latency`` (issue #18).

For each model the original is pruned by ``l1`` (a) to 50% of the MACs with exact widths
(``round_to=None``, the library's old default), (b) to 50% of the MACs with the command line's
default ``round_to=8``, and (c) with ``target_latency`` 0.7 / 0.5 / 0.35 on ONNX Runtime and on
OpenVINO (a per-group latency table measured here below batch 16, a latency model fitted to
end-to-end measurements from it; widths searched against it, measured end to end and
tightened). Every pruned model is then verified and timed against the original on each
runtime, interleaved (A B B A ...), one thread:

* ``latency ratio`` = the median over rounds of pruned / original call time on that runtime
  and batch size (``prunekit.measure.runtimes.pair_ratio``);
* ``efficiency`` = MACs ratio / latency ratio (1: latency falls as fast as the MACs);
* for (c): ``measured`` = that re-measurement of the final model, beside the target and the
  search's own prediction and measurement.

Models: ResNet-20 at 1x28x28 (zoo), ResNet-18 and MobileNetV2 at 3x224x224
(bench/imagenet_models.py: ImageNet strides, built from prunekit's blocks). Weights are the
initialisation: latency depends on the shapes only. Results: bench/results/runtimes.{json,md}.

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/runtimes.py            # ~15 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/runtimes.py --budget-batches 1,64  # 40 min, tables cached
    OMP_NUM_THREADS=1 .venv/bin/python bench/runtimes.py --models resnet20 --name runtimes_quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.engine.budget import LATENCY_PREDICTORS  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402
from prunekit.measure.runtimes import profile_runtimes  # noqa: E402
from prunekit.models import create  # noqa: E402

MODELS = {  # name -> (builder, input shape, batch sizes timed, batch sizes of the latency budget)
    "resnet20": (lambda: create("resnet20", num_classes=10, in_channels=1).eval(),
                 (1, 28, 28), (1, 64), (1, 64)),
    "resnet18": (lambda: __import__("imagenet_models").resnet18(), (3, 224, 224), (1, 16, 64), (1,)),
    "mobilenetv2": (lambda: __import__("imagenet_models").mobilenetv2(), (3, 224, 224), (1, 16, 64), (1,)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,resnet18,mobilenetv2")
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    p.add_argument("--targets", default="0.7,0.5,0.35", help="latency targets, or 'none'")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per setting")
    p.add_argument("--name", default="runtimes")
    p.add_argument("--no-uniform", action="store_true", help="only the --target-latency rows")
    p.add_argument("--budget-batches", default=None,
                   help="batch sizes of the --target-latency rows (default: the model's, 1 and 64 "
                        "for resnet20, 1 for the 224x224 models)")
    p.add_argument("--retime-sessions", type=int, default=3,
                   help="fresh sessions the result of a --target-latency search is re-timed in "
                        "(the median is reported)")
    p.add_argument("--retime-precision", type=float, default=0.01,
                   help="standard error of the ratio each re-timing session times on until "
                        "(30 s at most), as the search's confirmation does")
    p.add_argument("--predictor", default="auto", choices=LATENCY_PREDICTORS,
                   help="latency predictor of the --target-latency search (auto: the table below "
                        "batch 16, the fitted model from it)")
    p.add_argument("--depth", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="--target-latency rows with --depth N (up to N residual branches per "
                        "stage removed whole first; auto, the default as on the command line: "
                        "one per stage tried where widths alone pay badly; results before "
                        "session 22 ran with 0)")
    p.add_argument("--round-tos", default="none,8",
                   help="round_to of the uniform 50%% MACs rows ('none': exact widths)")
    return p.parse_args(argv)


def timed_rows(model: str, setting: str, net, pruned, x, batches, runtimes, seconds, macs_ratio,
               extra=None, sessions: int = 1, precision: float | None = None) -> list[dict]:
    """One row per runtime and batch: pruned vs original timed interleaved; with ``sessions``
    > 1, in that many fresh sessions each, the row holding the session of the median ratio
    (``retimed``: every session's ratio); ``precision``: each session times on until the
    ratio's standard error is at most this (30 s at most)."""
    reps = [profile_runtimes(pruned, x, batches, runtimes, original=net, max_seconds=seconds,
                             threads=1, precision=precision) for _ in range(sessions)]
    rows = []
    for rt in reps[0]["runtimes"]:
        for b in map(str, batches):
            recs = [rep["runtimes"][rt] for rep in reps]
            if any("ratio" not in rec for rec in recs):
                rows.append({"model": model, "setting": setting, "runtime": rt, "batch": b,
                             "ok": False, "error": next(r.get("error") for r in recs if "ratio" not in r)})
                continue
            recs.sort(key=lambda rec: rec["ratio"][b])
            rec = recs[len(recs) // 2]
            ratio = rec["ratio"][b]
            rows.append({"model": model, "setting": setting, "runtime": rt, "batch": int(b),
                         "ok": all(r["ok"] for r in recs), "macs_ratio": macs_ratio,
                         "original_ms": rec["original_latency_ms"][b]["median"],
                         "pruned_ms": rec["latency_ms"][b]["median"], "latency_ratio": ratio,
                         "efficiency": macs_ratio / ratio, **(extra or {})})
            if sessions > 1:
                rows[-1]["retimed"] = [round(r["ratio"][b], 4) for r in recs]
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    runtimes = args.runtimes.split(",")
    targets = [] if args.targets == "none" else [float(t) for t in args.targets.split(",")]
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name in args.models.split(","):
        build, shape, batches, budget_batches = MODELS[name]
        if args.budget_batches:
            budget_batches = tuple(int(b) for b in args.budget_batches.split(","))
        torch.manual_seed(0)
        net = build()
        x = torch.randn(1, *shape)
        fractions = (0.25, 0.5, 0.75) if shape[-1] < 100 else (0.375, 0.75)  # cheaper at 224x224
        uniform = [] if args.no_uniform else [
            ("uniform 50% MACs, exact widths", None) if q == "none" else
            (f"uniform 50% MACs, round_to {q}{' (default)' if q == '8' else ''}", int(q))
            for q in args.round_tos.split(",")]
        for setting, round_to in uniform:
            res = prunekit.prune(net, x, method="l1", target_macs=0.5, round_to=round_to)
            rows += timed_rows(name, setting, net, res.model, x, batches, runtimes, args.seconds,
                               res.report["macs_fraction"])
            print(f"[{time.perf_counter() - t_start:.0f} s] {name}: {setting} done", flush=True)
        for rt in runtimes:
            for b in budget_batches:
                for f in targets:
                    t0 = time.perf_counter()
                    try:
                        res = prunekit.prune(net, x, method="l1", target_latency=f, runtime=rt,
                                             latency_batch_size=b, latency_threads=1,
                                             latency_fractions=fractions,
                                             latency_predictor=args.predictor,
                                             latency_depth=args.depth)
                    except ConfigError as e:  # a target the widths cannot reach
                        rows.append({"model": name, "setting": f"target latency {f}", "runtime": rt,
                                     "batch": b, "target": f, "error": str(e)})
                        continue
                    lb = res.report["latency_budget"]
                    extra = {"target": f, "predicted": lb["predicted_ratio"],
                             "confirmed": lb.get("confirmed_ratio"),
                             "search_measured": lb["measured_ratio"], "rounds": len(lb["rounds"]),
                             "table_s": lb["table"]["seconds"], "table_cached": lb["table"]["cached"],
                             "predictor": lb.get("predictor"),
                             "fit": {k: round(v, 3) for k, v in lb["table"].get("fit", {}).items()},
                             # a confirmed round: its search measurement, then the median
                             # of its fresh sessions (measured_ratio) after it
                             "search_rounds": [(r["phase"], round(r["predicted_ratio"], 3),
                                                round(r.get("search_ratio", r["measured_ratio"]), 3),
                                                round(r["macs_fraction"], 3),
                                                *([round(r["confirmed_ratio"], 3)]
                                                  if "confirmed_ratio" in r else []))
                                               for r in lb["rounds"]],
                             "search_repeats": lb.get("repeats", {}),
                             "block": lb.get("block"),
                             "depth_branches": (lb.get("depth") or {}).get("branches"),
                             "depth_auto": lb.get("depth_auto"),
                             "prune_s": time.perf_counter() - t0}
                    got = timed_rows(name, f"target latency {f}", net, res.model, x, [b], [rt],
                                     args.seconds, res.report["macs_fraction"], extra,
                                     sessions=args.retime_sessions,
                                     precision=args.retime_precision)
                    for r in got:
                        r["measured"] = r.get("latency_ratio")
                        if r.get("latency_ratio") is not None:
                            r["in_window"] = f - 0.05 <= round(r["latency_ratio"], 3) <= f
                    rows += got
                    print(f"[{time.perf_counter() - t_start:.0f} s] {name}: target {f} on {rt} "
                          f"batch {b}: measured {got[0].get('latency_ratio')}", flush=True)
        payload = {"settings": {**vars(args), "threads": 1, "method": "l1"},
                   "wall_s": time.perf_counter() - t_start}
        write_results(args.name, payload, rows,
                      ["model", "setting", "runtime", "batch", "macs_ratio", "original_ms", "pruned_ms",
                       "latency_ratio", "efficiency", "target", "in_window", "retimed", "predicted",
                       "search_measured", "confirmed", "rounds", "predictor", "table_s", "table_cached",
                       "ok"],
                      "Speed on the deployment runtime: uniform MACs budget vs --target-latency",
                      notes="latency_ratio: the median per-round ratio of pruned to original "
                            "latency, timed interleaved on the runtime (one thread); "
                            "efficiency = macs_ratio / latency_ratio; "
                            "for target-latency rows, latency_ratio is the final model re-timed "
                            "after the search, the median of `retimed` (fresh sessions, each "
                            "timed until the ratio's standard error is at most --retime-precision "
                            "or 30 s; a session's ratio is its median per-round ratio; in_window: "
                            "within [target - 0.05, target] at three decimals); search_measured: "
                            "the search's accepted value (the median of its confirmation "
                            "sessions; the measurement that made it a candidate does not vote), "
                            "confirmed: the same, predicted: the table's or the model's "
                            "prediction. Command: `OMP_NUM_THREADS=1 "
                            f".venv/bin/python bench/runtimes.py {' '.join(sys.argv[1:])}`.")
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
