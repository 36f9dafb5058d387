"""Where does centripetal pruning lose accuracy on a short budget? An ablation on ResNet-20.

On the trained Fashion-MNIST ResNet-20 at 40% of the MACs, with the same optimizer (SGD
Nesterov, lr ``--lr``, cosine, batch 128) and ``--epochs`` epochs of training each:

- ``csgd (<clustering>)``: S1-S4 with agglomerative / k-means / even clustering; no fine-tuning;
- ``mean-merge + ft``: S1 and S2 (agglomerative), then every cluster's members set to their
  mean (kernel, bias, BN gamma/beta), merged at once (S4), BatchNorm statistics recalibrated,
  and the merged network fine-tuned with plain SGD — the centripetal *end point* without the
  centripetal *dynamics* (members sharing one mean gradient);
- ``tp:l1``: Torch-Pruning's L1 pruner, fine-tuned as long.

Results: ``bench/results/<--name>.{json,md}`` (default ``csgd_ablation``).

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/csgd_ablation.py --epochs 1
    OMP_NUM_THREADS=1 .venv/bin/python bench/csgd_ablation.py --epochs 1 --round-to 8 \
        --clusterings agglomerative --checkpoint bench/baselines/resnet20_fashion-mnist_30ep.pt \
        --name csgd30_ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import budget_kwargs, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.engine import analyse  # noqa: E402
from prunekit.engine.budget import solve_budget  # noqa: E402
from prunekit.engine.surgery import _per_channel_tensors  # noqa: E402
from prunekit.measure import count  # noqa: E402
from prunekit.methods import csgd  # noqa: E402
from prunekit.train import TrainConfig, evaluate, fit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist.pt")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--survey-samples", type=int, default=1000)
    p.add_argument("--survey-statistic", default="gap", choices=csgd.STATISTICS)
    p.add_argument("--round-to", type=int, default=None,
                   help="round every width down to a multiple of N (as bench/csgd.py --round-to)")
    p.add_argument("--clusterings", default=",".join(csgd.CLUSTERING_METHODS),
                   help="comma-separated S2 methods for the csgd rows (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="csgd_ablation", help="results file stem")
    return p.parse_args(argv)


def clustered_copy(checkpoint: str, example: torch.Tensor, train, target_macs: float,
                   round_to: int | None, samples: int, statistic: str, clustering: str, seed: int):
    """(model, info, clusters): a fresh copy of the checkpoint, its analysis, and S1 + S2 of
    every group the budget narrows, at the budget's widths (as ``prune(method="csgd")``)."""
    work = prunekit.load(checkpoint)[0]
    info = analyse(work, example)
    _, widths, _ = solve_budget(info, target_macs, round_to=round_to)
    targets = {g.name: widths[g.name] for g in info.groups if widths[g.name] < g.size}
    vectors = csgd.survey(work, train, list(targets), samples=samples, info=info, statistic=statistic)
    return work, info, {n: csgd.cluster(vectors[n], k, clustering, seed=seed) for n, k in targets.items()}


@torch.no_grad()
def set_to_centres(info, clusters: dict[str, list[list[int]]], centre: str = "mean") -> None:
    """Every member's per-channel tensors (all producers and channel-wise layers) := the
    cluster's centre: the members' ``"mean"`` (S3's end point), or those of the ``"strongest"``
    member (largest L1 norm of its producer kernels, summed over the group's producers)."""
    groups = {g.name: g for g in info.groups}
    for name, partition in clusters.items():
        g = groups[name]
        for members in partition:
            best = None
            if centre == "strongest":
                norms = sum(torch.stack([_per_channel_tensors(s)[0][s.positions[m]].abs().sum()
                                         for m in members]) for s in g.producers)
                best = members[int(norms.argmax())]
            for slot in g.producers + g.channelwise:
                for t in _per_channel_tensors(slot):
                    c = (torch.stack([t[slot.positions[m]] for m in members]).mean(0) if best is None
                         else t[slot.positions[best]].clone())
                    for m in members:
                        t[slot.positions[m]] = c


def recalibrate_and_train(model, train, test, cfg) -> tuple[float, float]:
    """Re-estimate BatchNorm statistics, evaluate, train with ``cfg``, evaluate again:
    (accuracy before training, after)."""
    csgd.recalibrate_bn(model, train, samples=2048)
    start = evaluate(model, test)
    fit(model, train, cfg)
    return start, evaluate(model, test)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    model, meta, train, test = load_baseline(args.checkpoint)
    example = train.example_input(1)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=128, seed=args.seed, eval_every=0)
    rows = [{"variant": "unpruned", "acc_final": evaluate(model, test)}]

    budget = budget_kwargs(None, args.target_macs, args.round_to)
    for clustering in args.clusterings.split(","):
        t0 = time.perf_counter()
        r = prunekit.prune(model, example, method="csgd", data=(train, test), seed=args.seed,
                           centripetal_epochs=args.epochs, lr=args.lr, batch_size=128,
                           survey_samples=args.survey_samples, clustering=clustering,
                           survey_statistic=args.survey_statistic,
                           **budget).report
        rows.append({"variant": f"csgd ({clustering})", "acc_start": r["method_acc_after_merge"],
                     "acc_final": r["acc_final"], "macs_fraction": r["macs_fraction"],
                     "epsilon": r["method_epsilon"], "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    work, info, clusters = clustered_copy(args.checkpoint, example, train, args.target_macs, args.round_to,
                                          args.survey_samples, args.survey_statistic, "agglomerative",
                                          args.seed)
    set_to_centres(info, clusters)
    merged = csgd.merge(work, example, clusters, info=info)
    start, final = recalibrate_and_train(merged, train, test, dataclasses.replace(cfg, epochs=args.epochs))
    macs = count(merged, example)[0] / count(model, example)[0]
    rows.append({"variant": "mean-merge + ft (agglomerative)", "acc_start": start,
                 "acc_final": final, "macs_fraction": macs,
                 "seconds": time.perf_counter() - t0})
    print(rows[-1], flush=True)

    t0 = time.perf_counter()
    r = prunekit.prune(model, example, method="tp:l1", data=(train, test), seed=args.seed,
                       finetune_epochs=args.epochs, train_config=cfg, calib_images=args.survey_samples,
                       **budget).report
    rows.append({"variant": "tp:l1 + ft", "acc_start": r["acc_pruned"], "acc_final": r["acc_final"],
                 "macs_fraction": r["macs_fraction"], "seconds": time.perf_counter() - t0})
    print(rows[-1], flush=True)

    rounded = f" (widths rounded down to multiples of {args.round_to})" if args.round_to else ""
    notes = (f"ResNet-20 on Fashion-MNIST (60,000 training images), {args.target_macs:.0%} of the "
             f"MACs{rounded}, {args.epochs} epoch(s) of training per variant, SGD lr {args.lr} cosine, "
             "batch 128. acc_start: accuracy of the pruned network before its training (for csgd: "
             "after S3 and the merge, i.e. equal to acc_final).")
    settings = {**vars(args), "meta": meta}
    js, md = write_results(args.name, {"settings": settings}, rows,
                           ["variant", "acc_start", "acc_final", "macs_fraction", "epsilon", "seconds"],
                           "Centripetal pruning on a short budget: an ablation", notes)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
