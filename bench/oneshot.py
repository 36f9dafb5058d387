"""One-shot pruning benchmark (issue: engine): every criterion of ours and Torch-Pruning's own
L1 / Taylor / BN-scale pruners on the same trained model, data and budget.

For each method: accuracy right after pruning and after the same fine-tuning budget, MACs and
params kept, and the CPU latency of the pruned model relative to the original (batch 1 and 64,
NCHW and channels_last, timed back to back) next to its MACs ratio.

    .venv/bin/python bench/oneshot.py --checkpoint bench/baselines/resnet20_fashion-mnist.pt --target-macs 0.4
    .venv/bin/python bench/oneshot.py --quick        # smoke test on a tiny, briefly trained model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, latency_ratios, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.criteria import CRITERIA  # noqa: E402
from prunekit.data import load  # noqa: E402
from prunekit.models import create  # noqa: E402
from prunekit.train import TrainConfig, fit  # noqa: E402

PEERS = ["tp:l1", "tp:taylor", "tp:bn-scale"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist.pt")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--methods", default=",".join(list(CRITERIA) + PEERS))
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-samples", type=int, default=10000,
                   help="fine-tune on the first N training images (the same for every method)")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="oneshot")
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test")
    return p.parse_args(argv)


def quick_model():
    train, test = load("fashion-mnist", train_samples=1000)
    model = create("resnet8", num_classes=10, in_channels=1)
    fit(model, train, TrainConfig(epochs=1, lr=0.05))
    return model, {"note": "quick"}, train, test.subset(500)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.quick:
        model, meta, train, test = quick_model()
        args.finetune_samples, args.calib_images = 500, 64
        args.finetune_epochs = min(args.finetune_epochs, 1)
    else:
        model, meta, train, test = load_baseline(args.checkpoint)
    ft_train = train.subset(args.finetune_samples)
    example = train.example_input(1)
    cfg = TrainConfig(lr=args.finetune_lr, batch_size=128, seed=args.seed)
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        res = prunekit.prune(model, example, method=method, target_macs=args.target_macs,
                             data=(ft_train, test), finetune_epochs=args.finetune_epochs,
                             train_config=cfg, calib_images=args.calib_images, seed=args.seed)
        lat = latency_ratios(model, res.model, example, max_seconds=1.0 if args.quick else 3.0)
        r = res.report
        row = {"method": method, "acc_before": r["acc_before"], "acc_pruned": r["acc_pruned"],
               "acc_final": r["acc_final"], "macs_fraction": r["macs_fraction"],
               "params_fraction": r["params_fraction"],
               "lat_b1": lat["b1_nchw"]["ratio"], "lat_b64": lat["b64_nchw"]["ratio"],
               "lat_b1_cl": lat["b1_channels_last"]["ratio"],
               "lat_b64_cl": lat["b64_channels_last"]["ratio"],
               "seconds": time.perf_counter() - t0, "latency": lat, "times": r["times"]}
        rows.append(row)
        print(f"{method:12s} pruned {row['acc_pruned']:.2f}  final {row['acc_final']:.2f}  "
              f"MACs {row['macs_fraction']:.3f}  b64 {row['lat_b64']:.3f}/{row['lat_b64_cl']:.3f}",
              flush=True)
    settings = {k: v for k, v in vars(args).items()} | {"baseline_meta": meta}
    cols = ["method", "acc_before", "acc_pruned", "acc_final", "macs_fraction", "params_fraction",
            "lat_b1", "lat_b64", "lat_b1_cl", "lat_b64_cl", "seconds"]
    notes = ("Accuracies in % on the full Fashion-MNIST test set. lat_* = pruned / original median "
             "latency on CPU, timed back to back (NCHW; *_cl: channels_last), to read against "
             "macs_fraction. Every method gets the same fine-tuning budget.")
    out = RESULTS if not args.quick else Path("/tmp/prunekit-bench-quick")
    js, md = write_results(args.name, {"settings": settings}, rows, cols,
                           f"One-shot pruning at {args.target_macs:.0%} of the MACs", notes, out)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
