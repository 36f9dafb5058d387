"""Benchmark: reconstruction pruning (ThiNet, LASSO) against L1 and Torch-Pruning's criteria.

A trained baseline (default ``bench/baselines/resnet20_fashion-mnist.pt``, read with ``prunekit.io.load``) is
pruned to each MACs target (default: 50% and 60% fewer MACs, i.e. ``--targets 0.5,0.4`` kept)
by every method, and scored on the test set with no fine-tuning and after the same fine-tuning
budget (``--finetune-epochs``, identical settings for all methods). For ThiNet and LASSO the
per-layer relative reconstruction errors and the selection time of the largest layer are
recorded too. Results: ``bench/results/reconstruction.json`` and ``.md`` (machine and settings
included).

Usage::

    python bench/reconstruction.py                          # the full benchmark
    python bench/reconstruction.py --finetune-epochs 10 --targets 0.5,0.4
    python bench/reconstruction.py --quick                  # smoke test (tiny model, minutes)

``--quick`` trains a ResNet-8 for two epochs on 2,000 images when no checkpoint is found, uses
one target (0.5), 200 calibration images, 1,000 test images and 20 fine-tuning steps, and writes
``reconstruction_quick.json`` / ``.md`` so the real results are never overwritten.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import prunekit  # noqa: E402
from prunekit.data import load as load_data  # noqa: E402
from prunekit.train import TrainConfig, evaluate, fit  # noqa: E402
from prunekit.utils import atomic_path  # noqa: E402

DEFAULT_METHODS = ("thinet", "lasso", "l1", "tp:l1", "tp:taylor", "tp:bn-scale")
RECONSTRUCTION = ("thinet", "lasso")


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "prunekit": prunekit.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def baseline(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The trained model: the checkpoint, or (``--quick`` without one) a ResNet-8 trained briefly."""
    path = Path(args.checkpoint)
    if path.is_file():
        model, meta = prunekit.load(path)
        return model.eval(), meta
    if not args.quick:
        sys.exit(f"error: baseline checkpoint not found: {path} (train it with `prunekit train "
                 "--model resnet20 --data fashion-mnist --out bench/baselines/resnet20_fashion-mnist.pt`)")
    from prunekit.models import create

    train, _ = load_data(args.data or "fashion-mnist", train_samples=2000)
    torch.manual_seed(args.seed)
    model = create("resnet8", num_classes=train.num_classes, in_channels=train.in_channels)
    fit(model, train, TrainConfig(epochs=2, batch_size=64, lr=0.05, augment=False, eval_every=0,
                                  device=args.device, seed=args.seed))
    return model.cpu().eval(), {"model": "resnet8 (quick: 2 epochs on 2,000 images)",
                                "data": args.data or "fashion-mnist"}


def finetune_config(args: argparse.Namespace) -> TrainConfig:
    """The fine-tuning every method gets (same epochs, schedule, lr, seed)."""
    return TrainConfig(epochs=max(1, args.finetune_epochs), batch_size=args.batch_size,
                       lr=args.finetune_lr, seed=args.seed, device=args.device, eval_every=0,
                       max_steps_per_epoch=args.finetune_steps)


def run_one(model, x, method: str, target: float, train, test, args) -> dict[str, Any]:
    options: dict[str, Any] = {"calib_images": args.calib_images}
    if method in RECONSTRUCTION:
        options["samples_per_image"] = args.samples_per_image
    t = time.perf_counter()
    res = prunekit.prune(model, x, method=method, target_macs=target, data=train, seed=args.seed,
                         evaluate=False, **options)
    prune_s = time.perf_counter() - t
    pruned = res.model
    row: dict[str, Any] = {
        "method": method, "target_macs": target, "macs_fraction": res.report["macs_fraction"],
        "params_fraction": res.report["params_fraction"], "prune_s": prune_s,
        "acc_pruned": evaluate(pruned, test, device=args.device),
    }
    if args.finetune_epochs > 0:
        t = time.perf_counter()
        fit(pruned, train, finetune_config(args))
        row["finetune_s"] = time.perf_counter() - t
        row["acc_finetuned"] = evaluate(pruned, test, device=args.device)
    if method in RECONSTRUCTION:
        layers = res.report.get("method_layers", [])
        row["largest_layer"] = res.report.get("method_largest_layer")
        row["largest_layer_select_s"] = res.report.get("method_largest_layer_select_s")
        row["layers"] = [{k: r[k] for k in ("group", "size", "kept", "err_input", "err_removed",
                                             "err_reconstructed", "select_s")} for r in layers]
    return row


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Reconstruction pruning benchmark{' (quick)' if s['quick'] else ''}", "",
             f"Baseline: {result['baseline']['model']} on {s['data']}, test accuracy "
             f"{result['baseline']['acc']:.2f}% ({s['test_images']} test images).", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), "",
             "| target MACs | method | MACs | params | acc, no fine-tuning | acc, fine-tuned | prune s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        ft = f"{r['acc_finetuned']:.2f}" if "acc_finetuned" in r else "-"
        lines.append(f"| {r['target_macs']:.2f} | {r['method']} | {r['macs_fraction']:.3f} | "
                     f"{r['params_fraction']:.3f} | {r['acc_pruned']:.2f} | {ft} | {r['prune_s']:.1f} |")
    for r in result["runs"]:
        if "layers" not in r:
            continue
        lines += ["", f"## {r['method']} at {r['target_macs']:.2f} of the MACs: per-layer relative "
                  "reconstruction error ||Y - Y_hat|| / ||Y||", "",
                  f"Selection time of the largest layer ({r['largest_layer']}): "
                  f"{r['largest_layer_select_s']:.3f} s.", "",
                  "| group | channels | kept | input drift | after removal | after reconstruction |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for layer in r["layers"]:
            lines.append(f"| {layer['group']} | {layer['size']} | {layer['kept']} | "
                         f"{layer['err_input']:.3f} | {layer['err_removed']:.3f} | "
                         f"{layer['err_reconstructed']:.3f} |")
    lines += ["", "Input drift: error of the consumer's output before this layer is pruned (from the "
              "layers pruned before it); inputs come from the pruned network, targets from the original."]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "baselines" / "resnet20_fashion-mnist.pt"))
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's, else fashion-mnist)")
    p.add_argument("--targets", default="0.5,0.4", help="fractions of the MACs kept")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--finetune-steps", type=int, default=None, help="cap on steps per fine-tuning epoch")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calib-images", type=int, default=500)
    p.add_argument("--samples-per-image", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--device", default="auto", help="evaluation and fine-tuning device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny and fast")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.finetune_epochs = min(args.finetune_epochs, 1)
        args.finetune_steps = args.finetune_steps or 20
        args.calib_images = min(args.calib_images, 200)
        args.train_samples = args.train_samples or 2000
        args.test_samples = args.test_samples or 1000
        args.targets = args.targets if args.targets != "0.5,0.4" else "0.5"
    out = Path(args.out) if args.out else ROOT / "results" / (
        "reconstruction_quick.json" if args.quick else "reconstruction.json")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    model, meta = baseline(args)
    args.data = args.data or meta.get("data") or "fashion-mnist"
    train, test = load_data(args.data, train_samples=args.train_samples)
    if args.test_samples:
        test = test.subset(args.test_samples)
    x = train.example_input(1)
    base_acc = evaluate(copy.deepcopy(model), test, device=args.device)
    print(f"baseline {meta.get('model', '?')}: {base_acc:.2f}% on {len(test)} test images", flush=True)

    runs = []
    targets = [float(t) for t in args.targets.split(",") if t]
    for target in targets:
        for method in [m for m in args.methods.split(",") if m]:
            row = run_one(model, x, method, target, train, test, args)
            runs.append(row)
            ft = f", fine-tuned {row['acc_finetuned']:.2f}%" if "acc_finetuned" in row else ""
            print(f"target {target:.2f} {method:12s} MACs {row['macs_fraction']:.3f}  "
                  f"acc {row['acc_pruned']:.2f}%{ft}  ({row['prune_s']:.1f} s)", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings["test_images"] = len(test)
    settings["train_images"] = len(train)
    result = {"machine": machine(), "settings": settings,
              "baseline": {"model": meta.get("model", "?"), "acc": base_acc, "meta": meta},
              "runs": runs}
    write(result, out)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
