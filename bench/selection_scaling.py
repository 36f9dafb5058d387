"""Wall time of the two channel selectors on large layers (moved out of the tests, which
check only what they return: a wall-clock limit in a test fails on a busy machine and passes
on a broken-but-fast one).

* csgd's agglomerative clustering (S2): 2048 channels x 256 survey values into 1280 clusters;
* ThiNet's greedy selection: 50,000 sampled values x 512 channels, keeping 256.

Usage::

    python bench/selection_scaling.py            # prints one line per case, median of --repeats

The tests used to allow 20 s for each; both take about 1 s on two idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunekit.methods import csgd, thinet


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2048, 256, generator=g)
    X = torch.randn(50_000, 512, generator=g)
    y = X[:, :300].sum(1)
    cases = {"csgd.cluster 2048 -> 1280 (256 values)": lambda: csgd.cluster(v, 1280),
             "thinet.select_channels 512 -> 256 (50,000 values)": lambda: thinet.select_channels(X, y, 256)}
    for name, fn in cases.items():
        print(f"{name}: {_time(fn, args.repeats):.2f} s (median of {args.repeats}, "
              f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
