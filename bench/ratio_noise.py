"""How precisely can a latency ratio be measured here? Estimator noise and session drift (issue #18).

A ``--target-latency`` search accepts widths whose measured ratio (pruned / original latency,
timed interleaved) lies in ``[f - 0.05, f]``, and ``bench/runtimes.py`` re-times the result
independently. Two sources of noise decide how often that re-timing agrees:

* **estimator noise**: the spread of one measurement of the ratio, from the calls it times.
  Compared here for two estimators over the same calls: the ratio of the two medians (what
  ``profile_runtimes`` reported up to session 14) and the median of the per-round ratios (each
  pruned call over the original call next to it, so a slow stretch of the machine that hits
  both cancels);
* **session drift**: how far the ratio of the *same* two models moves between fresh runtime
  sessions (new ONNX Runtime / OpenVINO sessions, minutes apart), beyond the estimator noise.

For each model, runtime and batch size the original and its uniform ``l1`` prune to 50% of
the MACs (``round_to=8``) are timed in ``--sessions`` fresh sessions of ``--rounds`` interleaved
rounds each. Reported: the per-round ratio's spread (robust sd, from the interquartile range),
the sd over disjoint windows of the estimators at the length the search's 1-second
measurement has, the rounds a standard error of 0.01 needs, and each session's ratio (the
median of all its per-round ratios) with the original's latency in that session.
Results: bench/results/ratio_noise.{json,md}.

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/ratio_noise.py        # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from runtimes import MODELS  # noqa: E402

import prunekit  # noqa: E402
from prunekit.measure.runtimes import Session, batched_input, time_pair  # noqa: E402


def robust_sd(values: list[float]) -> float:
    """Standard deviation estimated from the interquartile range (normal data: the sd)."""
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 1.349


def window_sd(ta: list[list[float]], tb: list[list[float]], width: int) -> tuple[float, float]:
    """sd over disjoint windows of ``width`` rounds (within each session) of the ratio of
    medians and of the median per-round ratio."""
    rm, pr = [], []
    for a, b in zip(ta, tb, strict=True):
        for i in range(0, len(a) - width + 1, width):
            wa, wb = a[i:i + width], b[i:i + width]
            rm.append(statistics.median(wb) / statistics.median(wa))
            pr.append(statistics.median([q / p for p, q in zip(wa, wb, strict=True)]))
    if len(rm) < 2:
        return float("nan"), float("nan")
    return statistics.stdev(rm), statistics.stdev(pr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,resnet18,mobilenetv2")
    p.add_argument("--runtimes", default="onnxruntime,openvino")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--session-seconds", type=float, default=25.0,
                   help="timed seconds per session (at least 40 rounds)")
    p.add_argument("--name", default="ratio_noise")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name in args.models.split(","):
        build, shape, _, _ = MODELS[name]
        torch.manual_seed(0)
        net = build()
        x = torch.randn(1, *shape)
        res = prunekit.prune(net, x, method="l1", target_macs=0.5, round_to=8)
        for rt in args.runtimes.split(","):
            for b in map(int, args.batches.split(",")):
                xb = batched_input(x, b)
                ta_s, tb_s = [], []
                with tempfile.TemporaryDirectory() as tmp:
                    for _ in range(args.sessions):
                        ref = Session(net, rt, xb, 1, Path(tmp))
                        sess = Session(res.model, rt, xb, 1, Path(tmp))
                        ta, tb = time_pair(ref.caller(xb), sess.caller(xb), min_repeats=40,
                                           max_seconds=args.session_seconds, max_repeats=100000)
                        ta_s.append(ta)
                        tb_s.append(tb)
                        del ref, sess
                per_call = statistics.median(ta_s[0]) + statistics.median(tb_s[0])
                one_second = max(7, int(1.0 / per_call))  # rounds of the search's 1-s measurement
                sd_rm, sd_pr = window_sd(ta_s, tb_s, one_second)
                pairs = [q / p for a, b_ in zip(ta_s, tb_s, strict=True) for p, q in zip(a, b_, strict=True)]
                sd_pair = robust_sd(pairs)
                sessions = [statistics.median([q / p for p, q in zip(a, b_, strict=True)])
                            for a, b_ in zip(ta_s, tb_s, strict=True)]
                rows.append({
                    "model": name, "runtime": rt, "batch": b,
                    "original_ms": [round(statistics.median(a) * 1e3, 2) for a in ta_s],
                    "rounds": [len(a) for a in ta_s], "rounds_1s": one_second,
                    "pair_sd": sd_pair, "sd_1s_ratio_of_medians": sd_rm, "sd_1s_pair_median": sd_pr,
                    "rounds_for_se_0.01": int((1.2533 * sd_pair / 0.01) ** 2) + 1,
                    "session_ratios": [round(s, 4) for s in sessions],
                    "session_range": max(sessions) - min(sessions)})
                print(f"[{time.perf_counter() - t_start:.0f} s] {name} {rt} batch {b}: sessions "
                      f"{rows[-1]['session_ratios']}, 1-s sd {sd_rm:.4f} / {sd_pr:.4f}", flush=True)
        write_results(args.name, {"settings": {**vars(args), "threads": 1},
                                  "wall_s": time.perf_counter() - t_start}, rows,
                      ["model", "runtime", "batch", "original_ms", "rounds", "rounds_1s", "pair_sd",
                       "sd_1s_ratio_of_medians", "sd_1s_pair_median", "rounds_for_se_0.01",
                       "session_ratios", "session_range"],
                      "Latency ratio: estimator noise and session drift",
                      notes="Original vs its uniform l1 prune to 50% of the MACs (round_to 8), timed "
                            "interleaved, one thread, in fresh sessions. pair_sd: robust sd of the "
                            "per-round ratios; sd_1s_*: sd over disjoint windows as long as the "
                            "search's 1-second measurement (rounds_1s) of the ratio of medians and "
                            "of the median per-round ratio; session_ratios: each session's median "
                            "per-round ratio over all its rounds. Command: `OMP_NUM_THREADS=1 "
                            f".venv/bin/python bench/ratio_noise.py {' '.join(sys.argv[1:])}`.")
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
