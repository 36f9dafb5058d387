"""Re-time a pruned architecture against its original on a quiet machine.

Latency depends only on the layer shapes, not on the weights, so a pruned model's speed can be
measured again, apart from the (long, CPU-loaded) accuracy run that produced it: this script
rebuilds the pruned shape from the per-group widths a benchmark recorded (for bench/csgd.py:
``summary.clusters_per_group``) by the engine's own surgery on the baseline checkpoint, checks
the MACs fraction against the recorded one, and times pruned vs original back to back at each
batch size in the three settings (nchw, channels_last, deploy = channels_last with BatchNorm
folded), ``--rounds`` times each, keeping the median ratio. On a shared machine the ratio moves
between processes far more than between rounds of one process (allocation and cache state), so
the whole measurement is repeated in ``--processes`` fresh processes and the median over them is
reported beside every process's own value.

Results: ``bench/results/<name>.json`` and ``.md``.

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/latency_widths.py --from bench/results/csgd.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import latency_ratios, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.engine import analyse, apply_plan  # noqa: E402
from prunekit.engine.budget import count_macs_params, width_plan  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", type=Path, required=True,
                   help="a results JSON with summary.clusters_per_group (group -> width)")
    p.add_argument("--checkpoint", default=None, help="default: the results' settings.checkpoint")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--processes", type=int, default=3, help="fresh processes to repeat it in")
    p.add_argument("--name", default=None, help="results stem (default <source stem>_latency)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, src: dict) -> dict:
    """This process's measurement: MACs fraction and latency ratios of the rebuilt shape."""
    torch.set_num_threads(1)
    widths = src["summary"]["clusters_per_group"]
    model, meta = prunekit.load(args.checkpoint or src["settings"]["checkpoint"])
    example = torch.randn(1, *meta["input_shape"][-3:])
    info = analyse(model, example)
    pruned = apply_plan(model, example, width_plan(info, widths))
    macs = count_macs_params(pruned, example)[0] / count_macs_params(model, example)[0]
    recorded = src["summary"].get("macs_fraction")
    if recorded is not None and abs(macs - recorded) > 1e-6:
        raise SystemExit(f"rebuilt MACs fraction {macs:.6f} differs from the recorded {recorded:.6f}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    return {"macs": macs, "latency": latency_ratios(model, pruned, example, batch_sizes=sizes,
                                                    max_seconds=args.max_seconds, rounds=args.rounds)}


def main(argv=None) -> int:
    args = parse_args(argv)
    src = json.loads(args.source.read_text())
    if args.child:
        print(json.dumps(measure(args, src)))
        return 0
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child"]
    runs = []
    for k in range(args.processes):
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"process {k + 1}: " + ", ".join(f"{key} {v['ratio']:.3f}"
                                                for key, v in runs[-1]["latency"].items()), flush=True)
    macs = runs[0]["macs"]
    lat: dict = {}
    rows = []
    for key in runs[0]["latency"]:
        per = sorted(runs, key=lambda r: r["latency"][key]["ratio"])
        mid = per[len(per) // 2]["latency"][key]
        lat[key] = {**mid, "processes": [r["latency"][key]["ratio"] for r in runs]}
        b, _, layout = key.partition("_")
        rows.append({"batch": int(b[1:]), "layout": layout, "original_ms": mid["original_ms"],
                     "pruned_ms": mid["pruned_ms"], "ratio": mid["ratio"], "speedup": 1 / mid["ratio"],
                     "per_process": ", ".join(f"{r:.3f}" for r in lat[key]["processes"])})
    target = macs / 0.8
    notes = (f"Shapes rebuilt from `{args.source}` (MACs fraction {macs:.4f}, checked against the "
             f"recorded one). The issue's target: speed-up >= 0.8 x the MACs reduction, i.e. a "
             f"latency ratio <= {target:.3f}. deploy = channels_last with every conv -> BatchNorm "
             f"pair folded into one conv (prunekit.measure.deploy.fold_batchnorm), same for both "
             f"models. One thread; in each of {args.processes} fresh processes the median of {args.rounds} "
             f"back-to-back rounds per setting; the table gives the median process and every "
             f"process's ratio.")
    name = args.name or f"{args.source.stem}_latency"
    summary = {"macs_fraction": macs, "target_ratio": target, "latency": lat,
               "meets_target": {k: v["ratio"] <= target for k, v in lat.items()}}
    settings = {"source": str(args.source), "checkpoint": args.checkpoint or src["settings"]["checkpoint"],
                "batch_sizes": args.batch_sizes, "rounds": args.rounds, "processes": args.processes,
                "max_seconds": args.max_seconds}
    js, md = write_results(name, {"settings": settings, "summary": summary}, rows,
                           ["batch", "layout", "original_ms", "pruned_ms", "ratio", "speedup", "per_process"],
                           "Pruned vs original latency, re-timed apart from the accuracy run", notes)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
