"""How good are centripetal pruning's clusters? A training-free scan of S1/S2 choices.

S3 ends with every cluster's members identical, near their mean; how much a cluster's mean
costs therefore depends on S1 (the survey statistic) and S2 (the clustering). This script
measures that cost without S3: on the trained ResNet-20 at 40% of the MACs, for every survey
statistic x clustering it

1. surveys (S1) and clusters (S2) every pruned group as ``prunekit.prune(method="csgd")`` does;
2. sets every cluster's members to their mean (kernel, bias, BN gamma/beta; ``--centres
   strongest`` instead copies the member with the largest kernel L1 norm), merges (S4) and
   re-estimates the BatchNorm statistics: ``acc_merged``;
3. fine-tunes the merged network for ``--steps`` SGD steps (lr 0.01 cosine): ``acc_steps``.

Torch-Pruning's L1 pruner at the same widths goes through steps 2-3 as the reference. The
higher ``acc_steps``, the less the clusters cost a short budget.

Results: ``bench/results/<--name>.{json,md}`` (default ``csgd_cluster_quality``).

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/csgd_cluster_quality.py \\
        --checkpoint bench/baselines/resnet20_fashion-mnist_30ep.pt --round-to 8
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import budget_kwargs, load_baseline, write_results  # noqa: E402
from csgd_ablation import clustered_copy, recalibrate_and_train, set_to_centres  # noqa: E402

import prunekit  # noqa: E402
from prunekit.methods import csgd  # noqa: E402
from prunekit.train import TrainConfig, evaluate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist_30ep.pt")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--survey-samples", type=int, default=1000)
    p.add_argument("--statistics", default=",".join(csgd.STATISTICS), help="comma-separated")
    p.add_argument("--clusterings", default=",".join(csgd.CLUSTERING_METHODS), help="comma-separated")
    p.add_argument("--centres", default="mean", help="comma-separated: mean, strongest")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps after the merge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="csgd_cluster_quality", help="results file stem")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    model, meta, train, test = load_baseline(args.checkpoint)
    example = train.example_input(1)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=128, seed=args.seed, eval_every=0,
                      max_steps_per_epoch=args.steps)
    rows = [{"variant": "unpruned", "acc_steps": evaluate(model, test)}]

    for statistic in args.statistics.split(","):
        for clustering in args.clusterings.split(","):
            for centre in args.centres.split(","):
                t0 = time.perf_counter()
                work, info, clusters = clustered_copy(args.checkpoint, example, train, args.target_macs,
                                                      args.round_to, args.survey_samples, statistic,
                                                      clustering, args.seed)
                set_to_centres(info, clusters, centre)
                merged = csgd.merge(work, example, clusters, info=info)
                acc_merged, acc_steps = recalibrate_and_train(merged, train, test, cfg)
                rows.append({"variant": f"{statistic} / {clustering} / {centre}",
                             "acc_merged": acc_merged, "acc_steps": acc_steps,
                             "largest_cluster": max(len(c) for p in clusters.values() for c in p),
                             "seconds": time.perf_counter() - t0})
                print(rows[-1], flush=True)

    t0 = time.perf_counter()
    pruned = prunekit.prune(model, example, method="tp:l1", data=(train, test), seed=args.seed,
                            finetune_epochs=0, calib_images=args.survey_samples,
                            **budget_kwargs(None, args.target_macs, args.round_to)).model
    acc_merged, acc_steps = recalibrate_and_train(pruned, train, test, cfg)
    rows.append({"variant": "tp:l1 (reference)", "acc_merged": acc_merged, "acc_steps": acc_steps,
                 "seconds": time.perf_counter() - t0})
    print(rows[-1], flush=True)

    notes = (f"ResNet-20 on Fashion-MNIST, {args.target_macs:.0%} of the MACs (widths rounded down to "
             f"multiples of {args.round_to}), survey of {args.survey_samples} training images. variant: "
             "survey statistic / clustering / cluster centre. acc_merged: every cluster set to its "
             "centre, merged, BatchNorm statistics re-estimated (no training); for tp:l1 the pruned "
             f"network likewise. acc_steps: after {args.steps} SGD steps (lr 0.01 cosine, batch 128).")
    js, md = write_results(args.name, {"settings": {**vars(args), "meta": meta}}, rows,
                           ["variant", "acc_merged", "acc_steps", "largest_cluster", "seconds"],
                           "Centripetal pruning: what the clusters cost before any S3", notes)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
