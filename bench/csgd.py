"""Centripetal (similarity-learning) pruning benchmark (seed 000, issue: csgd).

On a trained baseline: prune with ``csgd`` to a MACs budget (or every layer at 5/8 width) and
report the accuracy right before and right after the S4 merge (equal: no fine-tuning), the
final accuracy against the unpruned model, Torch-Pruning's L1 / Taylor / BN-scale pruners
fine-tuned for as many epochs as the centripetal training took (same optimizer and cosine
schedule), the measured CPU latency ratio at batch 64 (NCHW and channels_last, timed back to
back) next to the MACs ratio, the survey memory and clustering time of the largest layer, a
similarity heatmap with the S2 dendrogram of one layer, and the per-layer cluster sizes.

    .venv/bin/python bench/csgd.py --checkpoint bench/baselines/resnet20_fashion-mnist.pt --target-macs 0.4
    .venv/bin/python bench/csgd.py --ratio 0.375        # every layer at 5/8 of its filters
    .venv/bin/python bench/csgd.py --quick              # smoke test on a briefly trained ResNet-8
    .venv/bin/python bench/csgd.py --epochs 10 --split-epochs 1 --split-only --round-to 8 \
        --distill --centripetal-distill --peers "" --name csgd_r8_1p9_kd   # distilled recipe
    .venv/bin/python bench/csgd.py --checkpoint bench/baselines/resnet20_fashion-mnist_30ep.pt \
        --epochs 10 --split-epochs 1 --split-only --round-to 8 --peers "" --name csgd30_r8_1p9

Writes ``bench/results/csgd.json``, ``csgd.md``, ``csgd_similarity.png`` and
``csgd_clusters.png`` (``csgd_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, budget_kwargs, latency_ratios, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.data import load  # noqa: E402
from prunekit.engine import analyse  # noqa: E402
from prunekit.methods import csgd  # noqa: E402
from prunekit.models import create  # noqa: E402
from prunekit.train import TrainConfig, evaluate, fit  # noqa: E402

PEERS = ["tp:l1", "tp:taylor", "tp:bn-scale"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist.pt")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--ratio", type=float, default=None,
                   help="remove this fraction of every layer's filters instead (0.375 = 5/8 width)")
    p.add_argument("--round-to", type=int, default=None,
                   help="round every kept width down to a multiple of this (csgd and peers alike)")
    p.add_argument("--epochs", type=int, default=3, help="centripetal epochs (the peers fine-tune as long)")
    p.add_argument("--train-samples", type=int, default=None, help="use the first N training images")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epsilon", default="auto", help='"auto" or a number')
    p.add_argument("--survey-samples", type=int, default=1000)
    p.add_argument("--survey-statistic", default="gap", choices=csgd.STATISTICS,
                   help="S1: GAP before the non-linearity (method default) or of the rectified map")
    p.add_argument("--bn-epsilon-scale", type=float, default=None,
                   help="epsilon of BN gamma/beta and biases relative to kernels (method default 1.0)")
    p.add_argument("--clustering", default="agglomerative", choices=csgd.CLUSTERING_METHODS)
    p.add_argument("--gradient", default="mean", choices=csgd.GRADIENTS,
                   help="S3's shared gradient (the document's mean, or the sum as an ablation)")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune (csgd after the merge, and every peer) with distillation from the "
                        "unpruned model")
    p.add_argument("--centripetal-distill", action="store_true",
                   help="also distil from the unpruned model during csgd's centripetal epochs")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated; empty for none (default {','.join(PEERS)}; tp:l1 with --quick)")
    p.add_argument("--split-epochs", type=int, default=0,
                   help="also run csgd with this many centripetal epochs, merged, then fine-tuned for "
                        "the rest of --epochs (same total budget); 0 = off")
    p.add_argument("--split-only", action="store_true",
                   help="run only the split schedule (--split-epochs centripetal, merge, fine-tune the "
                        "rest), not the all-centripetal run; the peers get --epochs")
    p.add_argument("--layer", default=None, help="group for the heatmap (default: the largest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default csgd / csgd_quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: ResNet-8 trained for ~250 steps on 4000 images, 1 epoch")
    return p.parse_args(argv)


def quick_baseline(seed: int):
    train, test = load("fashion-mnist", train_samples=4000)
    torch.manual_seed(seed)
    model = create("resnet8", num_classes=10, in_channels=1)
    fit(model, train, TrainConfig(epochs=4, lr=0.05, batch_size=64, seed=seed))
    return model.eval(), {"note": "quick: resnet8, 4 epochs on 4000 images"}, train, test.subset(1000)


def figures(model, train, layer: str | None, samples: int, statistic: str, stem: str,
            sizes: dict[str, list[int]]) -> dict[str, Any]:
    """Similarity heatmap + S2 dendrogram of one layer (of the unpruned model), and the
    per-group cluster sizes (``sizes``: group -> size of each cluster)."""
    from scipy.cluster.hierarchy import dendrogram

    x = train.example_input(1)
    info = analyse(model, x)
    group = info.group_of(layer) if layer else max(info.groups, key=lambda g: (g.size, -len(g.producers)))
    vectors = csgd.survey(model, train, [group.name], samples=samples, info=info,
                          statistic=statistic)[group.name]
    sim = csgd.similarity(vectors).numpy()
    tree = csgd.merge_tree(vectors)
    fig = plt.figure(figsize=(11, 6))
    ax_d = fig.add_axes([0.05, 0.1, 0.25, 0.8])
    leaves = dendrogram(tree, orientation="left", ax=ax_d, no_labels=True, color_threshold=0,
                        above_threshold_color="k")["leaves"]
    ax_d.set_xlabel("1 - Pearson (S2 merges)")
    ax_h = fig.add_axes([0.32, 0.1, 0.5, 0.8])
    order = leaves[::-1]  # dendrogram leaves run bottom-up
    im = ax_h.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    ax_h.set_title(f"{group.name}: Pearson similarity of GAP survey vectors "
                   f"({statistic}; {group.size} channels, {len(group.producers)} producer(s))", fontsize=9)
    ax_h.set_xticks([])
    ax_h.set_yticks([])
    fig.colorbar(im, cax=fig.add_axes([0.84, 0.1, 0.02, 0.8]))
    heat = RESULTS / f"{stem}_similarity.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)

    names = list(sizes)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [sum(sizes[n]) for n in names], 0.4, label="channels", color="0.7")
    ax.bar(pos + 0.2, [len(sizes[n]) for n in names], 0.4, label="clusters (kept)", color="C0")
    ax.plot(pos, [max(sizes[n]) for n in names], "k.", label="largest cluster")
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=70, fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("csgd: channels, clusters and largest cluster per group", fontsize=9)
    fig.tight_layout()
    sizes = RESULTS / f"{stem}_clusters.png"
    fig.savefig(sizes, dpi=110)
    plt.close(fig)
    off = sim[~np.eye(len(sim), dtype=bool)]
    return {"layer": group.name, "channels": group.size, "heatmap": str(heat.name),
            "cluster_sizes_plot": str(sizes.name),
            "mean_abs_offdiag_similarity": float(np.abs(off).mean()) if off.size else None,
            "max_offdiag_similarity": float(off.max()) if off.size else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    stem = args.name or ("csgd_quick" if args.quick else "csgd")
    options: dict[str, Any] = {}
    if args.peers is None:
        args.peers = "tp:l1" if args.quick else ",".join(PEERS)
    if args.quick:
        model, meta, train, test = quick_baseline(args.seed)
        args.epochs, args.survey_samples = 1, 256
        args.batch_size = 64
        options["bn_epsilon_scale"] = 1.0  # one short epoch: BN parameters must converge as fast
    else:
        model, meta, train, test = load_baseline(args.checkpoint, train_samples=args.train_samples)
    if args.bn_epsilon_scale is not None:
        options["bn_epsilon_scale"] = args.bn_epsilon_scale
    if args.gradient != "mean":
        options["gradient"] = args.gradient
    if args.centripetal_distill:
        options["centripetal_distill"] = True
    epsilon = args.epsilon if args.epsilon == "auto" else float(args.epsilon)
    budget = budget_kwargs(args.ratio, args.target_macs, args.round_to)
    example = train.example_input(1)
    RESULTS.mkdir(parents=True, exist_ok=True)

    split = 0 < args.split_epochs < args.epochs
    if args.split_only and not split:
        raise SystemExit("--split-only needs 0 < --split-epochs < --epochs")
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed)  # csgd's optimizer

    def prune_csgd(centripetal_epochs: int):
        """csgd with this many centripetal epochs, then fine-tuning for the rest of --epochs."""
        return prunekit.prune(model, example, method="csgd", data=(train, test), seed=args.seed,
                              centripetal_epochs=centripetal_epochs, lr=args.lr,
                              batch_size=args.batch_size, epsilon=epsilon,
                              survey_samples=args.survey_samples, clustering=args.clustering,
                              survey_statistic=args.survey_statistic,
                              finetune_epochs=args.epochs - centripetal_epochs, distill=args.distill,
                              train_config=cfg, **options, **budget)

    t0 = time.perf_counter()
    acc_unpruned = evaluate(model, test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cent = args.split_epochs if args.split_only else args.epochs
        res = prune_csgd(cent)
    r = res.report
    csgd_seconds = time.perf_counter() - t0
    cent_run = int(r["method_train_epochs"])
    epochs_run = cent_run + (args.epochs - cent)

    def row(method: str, result, epochs: int, seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """A table row for a pruned result (accuracies, sizes, batch-64 latency ratios)."""
        rep, lat = result.report, latency_ratios(model, result.model, example, batch_sizes=(64,),
                                                max_seconds=1.0 if args.quick else 3.0,
                                                rounds=1 if args.quick else 3)
        merged = "method_acc_before_merge" in rep
        return {"method": method, "acc_before_merge": rep.get("method_acc_before_merge"),
                "acc_pruned": rep["method_acc_after_merge"] if merged else rep["acc_pruned"],
                "acc_final": rep["acc_final"], "macs_fraction": rep["macs_fraction"],
                "params_fraction": rep["params_fraction"], "train_epochs": epochs,
                "lat_b64_nchw": lat["b64_nchw"]["ratio"], "lat_b64_cl": lat["b64_channels_last"]["ratio"],
                "lat_b64_dep": lat["b64_deploy"]["ratio"], "seconds": seconds}, lat

    rows = [{"method": "unpruned", "acc_final": acc_unpruned, "macs_fraction": 1.0,
             "params_fraction": 1.0, "train_epochs": 0}]
    label = f"csgd {cent} + {args.epochs - cent} ft" if args.split_only else f"csgd ({args.clustering})"
    csgd_row, lat = row(label, res, epochs_run, csgd_seconds)
    rows.append(csgd_row)
    print(f"csgd: acc unpruned {acc_unpruned:.2f}, before merge {r['method_acc_before_merge']:.2f}, "
          f"after merge {r['method_acc_after_merge']:.2f}; MACs {r['macs_fraction']:.3f}; "
          f"latency b64 nchw {lat['b64_nchw']['ratio']:.3f} channels_last "
          f"{lat['b64_channels_last']['ratio']:.3f} deploy {lat['b64_deploy']['ratio']:.3f}; "
          f"epochs {epochs_run}, converged "
          f"{r['method_converged']} (distance {r['method_max_intra_distance']:.2e}, "
          f"epsilon {r['method_epsilon']:.3g})", flush=True)

    peer_epochs = max(1, epochs_run)
    if split and not args.split_only:
        t0 = time.perf_counter()
        ft = args.epochs - args.split_epochs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sp = prune_csgd(args.split_epochs)
        s = sp.report
        rows.append(row(f"csgd {args.split_epochs} + {ft} ft", sp, args.epochs, time.perf_counter() - t0)[0])
        print(f"csgd {args.split_epochs}+{ft}: before merge {s['method_acc_before_merge']:.2f}, "
              f"after {s['method_acc_after_merge']:.2f}, final {s['acc_final']:.2f}", flush=True)
    for peer in [p for p in args.peers.split(",") if p]:
        t0 = time.perf_counter()
        pr = prunekit.prune(model, example, method=peer, data=(train, test), seed=args.seed,
                            finetune_epochs=peer_epochs, distill=args.distill, train_config=cfg,
                            calib_images=args.survey_samples, **budget)
        p = pr.report
        rows.append(row(peer, pr, peer_epochs, time.perf_counter() - t0)[0])
        print(f"{peer}: acc pruned {p['acc_pruned']:.2f}, final {p['acc_final']:.2f}, "
              f"MACs {p['macs_fraction']:.3f}", flush=True)

    peers = [row for row in rows if row["method"].startswith("tp:")]
    best_peer = max(peers, key=lambda row: row["acc_final"]) if peers else None
    sizes = r["method_cluster_sizes"]
    fig_info = figures(model, train, args.layer, args.survey_samples, args.survey_statistic, stem,
                       sizes)
    merge_gap = abs(r["method_acc_after_merge"] - r["method_acc_before_merge"])
    summary = {
        "acc_unpruned": acc_unpruned,
        "acc_before_merge": r["method_acc_before_merge"], "acc_after_merge": r["method_acc_after_merge"],
        "merge_gap_points": merge_gap, "merge_exact_within_0.05": merge_gap <= 0.05,
        "acc_final": r["acc_final"], "acc_change_vs_unpruned": r["acc_final"] - acc_unpruned,
        "best_peer": best_peer["method"] if best_peer else None,
        "best_peer_acc_final": best_peer["acc_final"] if best_peer else None,
        "macs_fraction": r["macs_fraction"], "params_fraction": r["params_fraction"],
        "latency_b64": lat, "converged": r["method_converged"],
        "max_intra_distance": r["method_max_intra_distance"],
        "initial_max_intra_distance": r["method_initial_max_intra_distance"],
        "epsilon": r["method_epsilon"], "epsilon_bn": r["method_epsilon_bn"],
        "centripetal_epochs_run": cent_run, "finetune_epochs_after_merge": args.epochs - cent,
        "distance_history": r["method_distance_history"],
        "survey_bytes_total": r["method_survey_bytes"], "survey_seconds": r["method_survey_seconds"],
        "clustering_seconds_total": r["method_clustering_seconds"],
        "largest_layer": r["method_largest_group"],
        "largest_layer_channels": r["method_largest_group_channels"],
        "largest_layer_survey_bytes": r["method_largest_group_survey_bytes"],
        "largest_layer_clustering_seconds": r["method_largest_group_clustering_seconds"],
        "clusters_per_group": r["method_clusters_per_group"], "cluster_sizes": sizes,
        "figures": fig_info, "warnings": [str(w.message) for w in caught],
    }
    settings = {"checkpoint": None if args.quick else args.checkpoint, "meta": meta, **budget,
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "epsilon": args.epsilon, "survey_samples": args.survey_samples,
                "survey_statistic": args.survey_statistic,
                "split_epochs": args.split_epochs, "distill": args.distill,
                "clustering": args.clustering, "train_samples": len(train), "test_samples": len(test),
                "peers": args.peers, "peer_finetune_epochs": peer_epochs, "seed": args.seed,
                "quick": args.quick, **{f"option_{k}": v for k, v in options.items()}}
    budget_text = (f"every layer at {1 - args.ratio:.3g} of its filters" if args.ratio is not None
                   else f"target {args.target_macs:.0%} of the MACs")
    if args.round_to is not None:
        budget_text += f", widths rounded down to multiples of {args.round_to} (peers at the same widths)"
    notes = "\n".join([
        f"Budget: {budget_text}. csgd: {cent_run} centripetal epoch(s) "
        f"(converged: {r['method_converged']}, max intra-cluster distance "
        f"{r['method_max_intra_distance']:.2e}, epsilon {r['method_epsilon']:.3g}, "
        f"BN/bias epsilon {r['method_epsilon_bn']:.3g}), "
        f"{args.epochs - cent if args.epochs > cent else 'no'} fine-tuning epoch(s) after the merge; "
        f"Torch-Pruning peers fine-tuned {peer_epochs} epoch(s) with the same optimizer and schedule.",
        "",
        f"- accuracy right before the merge {r['method_acc_before_merge']:.2f}, right after "
        f"{r['method_acc_after_merge']:.2f} (gap {merge_gap:.3f} points); unpruned {acc_unpruned:.2f}",
        f"- latency ratio at batch 64 (pruned / original, back to back): NCHW "
        f"{lat['b64_nchw']['ratio']:.3f}, channels_last {lat['b64_channels_last']['ratio']:.3f}, "
        f"deploy (channels_last, BatchNorm folded into the convs) {lat['b64_deploy']['ratio']:.3f} "
        f"(median of {1 if args.quick else 3} round(s) each); MACs ratio {r['macs_fraction']:.3f}; "
        f"target: speed-up >= 0.8 x the MACs reduction, i.e. latency ratio <= {r['macs_fraction'] / 0.8:.3f}",
        f"- survey: {r['method_survey_samples']} images ({r['method_survey_statistic']}), "
        f"{r['method_survey_bytes'] / 2**20:.2f} MiB of "
        f"GAP vectors in all; largest layer {r['method_largest_group']} "
        f"({r['method_largest_group_channels']} channels): "
        f"{r['method_largest_group_survey_bytes'] / 2**10:.1f} KiB, clustered in "
        f"{r['method_largest_group_clustering_seconds']:.3f} s",
        f"- figures: {fig_info['heatmap']} (layer {fig_info['layer']}), {fig_info['cluster_sizes_plot']}",
    ])
    columns = ["method", "acc_before_merge", "acc_pruned", "acc_final", "macs_fraction",
               "params_fraction", "train_epochs", "lat_b64_nchw", "lat_b64_cl", "lat_b64_dep",
               "seconds"]
    js, md = write_results(stem, {"settings": settings, "summary": summary}, rows, columns,
                           "Centripetal (similarity-learning) pruning vs Torch-Pruning", notes)
    print(f"wrote {js} and {md}")
    if not math.isfinite(merge_gap) or merge_gap > 0.05:
        print(f"WARNING: the merge changed accuracy by {merge_gap:.3f} points", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
