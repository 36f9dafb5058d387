"""Seed 004's case on Fashion-MNIST: iterative Taylor-FO pruning of a trained VGG-16.

The article pruned a VGG-16 cats-vs-dogs classifier iteratively (score with Taylor-FO, remove the
lowest filters network-wide, fine-tune, repeat) and reported a ~3x faster CPU inference at
batch 1, a checkpoint ~1/4 of the size, and 98.7 % -> 97.5 % accuracy. Here: VGG-16-BN on
Fashion-MNIST (``bench/cache/vgg16_bn.pt``, or trained by this script with ``--train-epochs``),
pruned with ``prunekit.prune(method="taylor")``; reported: accuracy before / after, MACs and
parameters kept, CPU latency at batch 1 (and 64) of pruned vs original timed back to back
(NCHW and channels_last), checkpoint size on disk, and the per-iteration history.

    .venv/bin/python bench/taylor_vgg.py --target-macs 0.33
    .venv/bin/python bench/taylor_vgg.py --train-epochs 10       # no cached baseline: train it
    .venv/bin/python bench/taylor_vgg.py --quick                 # smoke test on a tiny VGG
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, latency_ratios, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.data import load  # noqa: E402
from prunekit.models import create  # noqa: E402
from prunekit.report import plots  # noqa: E402
from prunekit.train import TrainConfig, fit  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(CACHE / "vgg16_bn.pt"))
    p.add_argument("--train-epochs", type=int, default=0,
                   help="train the baseline for N epochs when no checkpoint exists (saved there)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-macs", type=float, default=None, help="default 0.33 (~3x fewer)")
    budget.add_argument("--ratio", type=float, default=None, help="fraction of all channels removed")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--finetune-epochs-per-step", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=2, help="after the last iteration")
    p.add_argument("--train-lr", type=float, default=0.05, help="learning rate of the baseline training")
    p.add_argument("--train-samples", type=int, default=None,
                   help="train the baseline on the first N training images (default: all)")
    p.add_argument("--finetune-samples", type=int, default=None,
                   help="fine-tune on the first N training images (default: all)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="taylor_vgg")
    p.add_argument("--quick", action="store_true", help="tiny VGG and data: a smoke test")
    args = p.parse_args(argv)
    if args.target_macs is None and args.ratio is None:
        args.target_macs = 0.33
    return args


def baseline(args: argparse.Namespace, train, test) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained VGG-16-BN: the cached checkpoint, or trained here with ``--train-epochs``."""
    path = Path(args.checkpoint)
    alt = path.with_name(f"{path.stem}_fashion-mnist{path.suffix}")
    for p in (path, alt):
        if p.is_file():
            model, meta = prunekit.load(p)
            return model, {**meta, "checkpoint": str(p)}
    if args.train_epochs <= 0:
        raise SystemExit(f"no baseline at {path} (or {alt}); pass --train-epochs N to train one")
    torch.manual_seed(args.seed)
    model = create("vgg16_bn", num_classes=train.num_classes, in_channels=train.in_channels)
    t0 = time.perf_counter()
    if args.train_samples:
        train = train.subset(args.train_samples)
    cfg = TrainConfig(epochs=args.train_epochs, lr=args.train_lr, batch_size=args.batch_size,
                      seed=args.seed, eval_every=0)
    result = fit(model, train, cfg, test_set=test)
    meta = {"dataset": "fashion-mnist", "test_acc": result.test_acc, "epochs": args.train_epochs,
            "train_samples": len(train), "input_shape": list(train.example_input(1).shape[1:]),
            "train_seconds": time.perf_counter() - t0, "trained_by": "bench/taylor_vgg.py"}
    path.parent.mkdir(parents=True, exist_ok=True)
    prunekit.save(model, path, meta)
    return model.eval(), {**meta, "checkpoint": str(path)}


def file_size(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.pt"
        prunekit.save(model, p)
        return p.stat().st_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.quick:
        train, test = load("fashion-mnist", train_samples=512)
        test = test.subset(256)
        model = create("vgg16_bn", num_classes=10, in_channels=1, width=0.25)
        fit(model, train, TrainConfig(epochs=1, lr=0.05, batch_size=64, eval_every=0))
        meta: dict[str, Any] = {"note": "quick: vgg16_bn width 0.25, 512 images, 1 epoch"}
        args.steps, args.calib_images, args.finetune_epochs = 2, 64, 1
        out = Path("/tmp/prunekit-bench-quick")
    else:
        train, test = load("fashion-mnist")
        model, meta = baseline(args, train, test)
        out = RESULTS
    ft_train = train.subset(args.finetune_samples) if args.finetune_samples else train
    example = train.example_input(1)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      max_steps_per_epoch=8 if args.quick else None)
    budget = {"target_macs": args.target_macs} if args.target_macs is not None else {"ratio": args.ratio}
    t0 = time.perf_counter()
    res = prunekit.prune(model, example, method="taylor", data=(ft_train, test), **budget,
                         steps=args.steps, calib_images=args.calib_images,
                         finetune_epochs_per_step=args.finetune_epochs_per_step,
                         finetune_epochs=args.finetune_epochs, train_config=cfg, seed=args.seed)
    seconds = time.perf_counter() - t0
    r = res.report
    lat = latency_ratios(model, res.model, example, batch_sizes=(1, 64),
                         max_seconds=1.0 if args.quick else 5.0)
    size0, size1 = file_size(model), file_size(res.model)
    row = {"model": "vgg16_bn", "acc_before": r["acc_before"], "acc_pruned": r["acc_pruned"],
           "acc_final": r["acc_final"], "macs_fraction": r["macs_fraction"],
           "params_fraction": r["params_fraction"], "size_mb_before": size0 / 2**20,
           "size_mb_after": size1 / 2**20, "size_fraction": size1 / size0,
           "b1_ms_before": lat["b1_nchw"]["original_ms"], "b1_ms_after": lat["b1_nchw"]["pruned_ms"],
           "b1_speedup": 1 / lat["b1_nchw"]["ratio"],
           "b1_speedup_cl": 1 / lat["b1_channels_last"]["ratio"],
           "b1_speedup_dep": 1 / lat["b1_deploy"]["ratio"],
           "b64_speedup": 1 / lat["b64_nchw"]["ratio"],
           "train_epochs_inside": r["method_train_epochs"], "seconds": seconds}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    plots.plot_layer_widths({"taylor": r["widths"]}, out / f"{args.name}_widths.png",
                               title="VGG-16-BN widths after iterative Taylor-FO pruning")
    settings = {k: v for k, v in vars(args).items()} | {"baseline_meta": meta,
                                                         "threads": torch.get_num_threads()}
    payload = {"settings": settings, "latency": lat, "history": r.get("method_history"),
               "report": {k: v for k, v in r.items() if k not in ("widths",)}, "widths": r["widths"],
               "figures": [str(out / f"{args.name}_widths.png")]}
    cols = ["model", "acc_before", "acc_pruned", "acc_final", "macs_fraction", "params_fraction",
            "size_mb_before", "size_mb_after", "size_fraction", "b1_ms_before", "b1_ms_after",
            "b1_speedup", "b1_speedup_cl", "b1_speedup_dep", "b64_speedup", "train_epochs_inside", "seconds"]
    notes = (f"Iterative Taylor-FO: {args.steps} iterations, {args.calib_images} calibration images "
             f"each, {args.finetune_epochs_per_step} fine-tuning epoch(s) between iterations and "
             f"{args.finetune_epochs} after the last. Accuracies in % on the Fashion-MNIST test set; "
             "speed-ups = original / pruned median CPU latency, timed back to back (b1: batch 1, "
             "NCHW; *_cl: channels_last); size = prunekit checkpoint on disk. The article's case "
             "(VGG-16, cats vs dogs): ~3x faster at batch 1, 1/4 of the file, 98.7 -> 97.5 %.")
    js, md = write_results(args.name, payload, [row], cols,
                           "Iterative Taylor-FO pruning of VGG-16-BN (seed 004)", notes, out)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
