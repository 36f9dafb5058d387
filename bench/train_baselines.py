"""Train the baseline (unpruned) models that the pruning benchmarks start from.

Trains each requested zoo model on Fashion-MNIST (all 60,000 training images unless
``--train-samples``), saves it with :func:`prunekit.io.save` under ``--out-dir`` and writes
``baselines.json`` and ``baselines.md`` under ``--results`` (entries of other models already
there are kept). A per-model training-state file lets an interrupted run continue with
``--resume``. Works under ``torchrun --nproc_per_node N`` (rank 0 writes the outputs).

Examples
--------
    .venv/bin/python bench/train_baselines.py                       # ResNet-20, 30 epochs
    .venv/bin/python bench/train_baselines.py --models resnet20,resnet56,vgg16_bn --resume
    .venv/bin/python bench/train_baselines.py --epochs 1 --train-samples 2000 \\
        --out-dir /tmp/cache --results /tmp/results                   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from prunekit.data import load
from prunekit.models import create
from prunekit.train import TrainConfig, fit
from prunekit.utils import atomic_path, resolve_device

DATASET = "fashion-mnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20", help="comma-separated zoo names (default: resnet20)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split across torchrun ranks)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--train-samples", type=int, default=None, help="use the first N training images")
    p.add_argument("--eval-every", type=int, default=5,
                   help="evaluate the 10,000 test images every N epochs (always at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is much faster on an oversubscribed shared CPU)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/cache"))
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--resume", action="store_true", help="continue from the state files in --out-dir")
    return p.parse_args(argv)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def machine(device: torch.device) -> dict:
    """Facts about where the numbers were measured."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_model(model: torch.nn.Module, path: Path, meta: dict) -> None:
    """``prunekit.io.save`` when available; otherwise a weights-only dict with the architecture."""
    model = model.cpu().eval()
    try:
        from prunekit.io import save
    except ImportError:
        with atomic_path(path) as tmp:
            torch.save({"arch": getattr(model, "prunekit_arch", None), "state_dict": model.state_dict(),
                        "meta": meta}, tmp)
        return
    save(model, path, meta)


def train_one(name: str, train, test, cfg: TrainConfig, args: argparse.Namespace) -> dict:
    torch.manual_seed(cfg.seed)
    model = create(name, num_classes=train.num_classes, in_channels=train.in_channels)
    state = args.out_dir / f"{name}_{DATASET}.state.pt"
    t0 = time.perf_counter()
    result = fit(model, train, cfg, test_set=test, checkpoint_path=state,
                 resume=args.resume and state.is_file())
    total = time.perf_counter() - t0
    entry = {
        "model": name, "dataset": DATASET, "test_acc": result.test_acc, "epochs": result.epochs_run,
        "seconds_per_epoch": result.seconds_per_epoch, "total_seconds": total,
        "train_samples": len(train), "test_samples": len(test),
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(args.out_dir / f"{name}_{DATASET}.pt"),
        "settings": dataclasses.asdict(cfg),
        "history": [{k: r[k] for k in ("epoch", "loss", "train_acc", "test_acc", "lr", "seconds")}
                    for r in result.history],
    }
    meta = {"dataset": DATASET, "test_acc": result.test_acc, "epochs": result.epochs_run,
            "input_shape": [train.in_channels, *train.image_size], "num_classes": train.num_classes,
            "mean": list(train.mean), "std": list(train.std), "train_samples": len(train)}
    if is_rank0():
        save_model(model, Path(entry["checkpoint"]), meta)
    return entry


def write_results(results_dir: Path, entries: list[dict], info: dict) -> None:
    """Merge ``entries`` into baselines.json (keyed by model) and rewrite baselines.md."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "baselines.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    models = {**old.get("models", {}), **{e["model"]: {**e, "machine": info} for e in entries}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"models": models}, indent=2) + "\n")
    lines = ["# Baselines on Fashion-MNIST", "",
             "| model | test acc (%) | epochs | train images | s/epoch | total (min) | params | batch | lr "
             "| device | machine |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for e in models.values():
        m, s = e["machine"], e["settings"]
        acc = f"{e['test_acc']:.2f}" if e["test_acc"] is not None else "-"
        lines.append(f"| {e['model']} | {acc} | {e['epochs']} | {e['train_samples']} | "
                     f"{e['seconds_per_epoch']:.1f} | {e['total_seconds'] / 60:.1f} | {e['params']:,} | "
                     f"{s['batch_size']} x{m['world_size']} | {s['lr']} | {m['device']} | "
                     f"{m['cpu_count']} CPUs, torch {m['torch']}, {m['platform']} |")
    lines += ["", "Settings: SGD (Nesterov, momentum 0.9), cosine schedule, weight decay and "
              "augmentation (random crop after 4-pixel padding, horizontal flip) as in `settings` "
              "of baselines.json. `s/epoch` is training time only; `total` includes evaluation.", ""]
    with atomic_path(results_dir / "baselines.md") as tmp:
        tmp.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # One group for all models (fit() would create and destroy one per model).
        dist.init_process_group("nccl" if resolve_device(args.device).type == "cuda" else "gloo")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, test = load(DATASET, train_samples=args.train_samples)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                      eval_every=args.eval_every)
    entries = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        entry = train_one(name, train, test, cfg, args)
        entries.append(entry)
        if is_rank0():
            print(f"{name}: {entry['test_acc']:.2f}% after {entry['epochs']} epochs, "
                  f"{entry['seconds_per_epoch']:.1f} s/epoch, {entry['total_seconds'] / 60:.1f} min")
            write_results(args.results, entries, machine(resolve_device(cfg.device)))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
