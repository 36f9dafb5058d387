"""How much a latency ratio moves between fresh runtime sessions (issue #18).

The same pruned model (``l1``, 50% of the MACs, widths rounded to 8) is timed against its
original, interleaved, in ``--repeats`` fresh sessions per runtime, batch size and timing length
(``max_seconds``). A spread that does not shrink with longer timing is between sessions (memory
layout, kernel choice), not timing noise: the latency search then averages several sessions
(``LatencyTarget.confirm_sessions``) and the bench re-times its results in several.
Results: bench/results/session_noise.{json,md}.

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/session_noise.py          # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from runtimes import MODELS  # noqa: E402

import prunekit  # noqa: E402
from prunekit.measure.latency_table import measure_ratio  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,mobilenetv2")
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--seconds", default="1,6", help="timing lengths (max_seconds) compared")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--name", default="session_noise")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        build, shape = MODELS[name][:2]
        torch.manual_seed(0)
        net = build()
        x = torch.randn(1, *shape)
        pruned = prunekit.prune(net, x, method="l1", target_macs=0.5, round_to=8, evaluate=False).model
        for rt in args.runtimes.split(","):
            for b in map(int, args.batches.split(",")):
                for secs in map(float, args.seconds.split(",")):
                    ratios = [measure_ratio(pruned, net, x, rt, b, 1, max_seconds=secs)[0]
                              for _ in range(args.repeats)]
                    rows.append({"model": name, "runtime": rt, "batch": b, "max_seconds": secs,
                                 "ratios": [round(r, 4) for r in ratios],
                                 "mean": statistics.mean(ratios), "sd": statistics.stdev(ratios),
                                 "range": max(ratios) - min(ratios)})
                    print(f"[{time.perf_counter() - t0:.0f} s] {name} {rt} batch {b} {secs} s: "
                          f"sd {rows[-1]['sd']:.3f}", flush=True)
    write_results(args.name, {"settings": vars(args), "wall_s": time.perf_counter() - t0}, rows,
                  ["model", "runtime", "batch", "max_seconds", "ratios", "mean", "sd", "range"],
                  "Latency ratio of one pruned model across fresh runtime sessions",
                  notes="l1, 50% of the MACs, round_to 8; each row: the same pruned model timed "
                        "against its original (interleaved, one thread) in `repeats` fresh "
                        "sessions. Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/session_noise.py "
                        + " ".join(sys.argv[1:]) + "` (quiet machine).")


if __name__ == "__main__":
    main()
