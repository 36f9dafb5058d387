"""Benchmark the learned pruning methods (AutoPruner, CURL) and small-data fine-tuning.

Part 1 -- the ResNet-20 Fashion-MNIST baseline pruned to ``--target-macs`` (default 0.4: 60%
fewer MACs) by AutoPruner and CURL against ThiNet / L1 and Torch-Pruning (``tp:l1``,
``tp:taylor``), every method with the same training budget: ``--budget-epochs`` epochs in all,
so AutoPruner's gate-training epochs are taken out of its fine-tuning epochs.

Part 2 -- the small-data case: the baseline pruned by CURL with only ``--small`` training
images (calibration included), then fine-tuned on those images with plain cross-entropy, or
with expansion + distillation + label refinement (:mod:`prunekit.train.smalldata`), plus two
ablations; every variant takes the same number of optimizer steps. Test accuracy is measured
on the full test set.

Results go to ``<results>/learned.json`` and ``learned.md`` (``learned_quick.*`` with
``--quick``), with the machine and the settings.

Examples
--------
    .venv/bin/python bench/learned.py                       # the full run (long on a CPU)
    .venv/bin/python bench/learned.py --quick               # minutes: a tiny model, few images
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit import methods
from prunekit.data import load
from prunekit.models import create
from prunekit.train import TrainConfig, evaluate, fit
from prunekit.train.smalldata import finetune_small_data
from prunekit.utils import atomic_path, resolve_device

DATASET = "fashion-mnist"
DEFAULT_METHODS = "autopruner,curl,curl[normalize=none],thinet,l1,tp:l1,tp:taylor"
DEFAULT_BASELINES = (Path("bench/baselines/resnet20_fashion-mnist.pt"),
                     Path("bench/cache/resnet20_fashion-mnist.pt"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, default=None,
                   help="checkpoint of the trained model (prunekit.io format); default "
                        "bench/baselines/resnet20_fashion-mnist.pt or bench/cache/resnet20_fashion-mnist.pt")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated; options in brackets, e.g. curl[normalize=l2,steps=2]")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--budget-epochs", type=float, default=10,
                   help="training epochs per method in all (method training + fine-tuning)")
    p.add_argument("--autopruner-epochs", type=int, default=2, help="gate-training epochs")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-samples", type=int, default=None)
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--small", type=int, default=1000, help="training images of the small-data case")
    p.add_argument("--small-epochs", type=float, default=20,
                   help="passes over the expanded small set (the plain run gets the same steps)")
    p.add_argument("--factor", type=int, default=5, help="expansion factor of the small set")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true",
                   help="a tiny ResNet-8 trained here for a minute, few images and epochs")
    return p.parse_args(argv)


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def quick_setup(args: argparse.Namespace) -> None:
    args.train_samples = args.train_samples or 2000
    args.test_samples = args.test_samples or 1000
    args.budget_epochs = min(args.budget_epochs, 2)
    args.autopruner_epochs = 1
    args.calib_images = min(args.calib_images, 64)
    args.small = min(args.small, 300)
    args.small_epochs = min(args.small_epochs, 2)
    args.factor = min(args.factor, 3)


def baseline(args: argparse.Namespace, train, test, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model to prune: ``--baseline``, else the default checkpoint, else (``--quick`` only) a
    tiny ResNet-8 trained here."""
    path = args.baseline
    if path is None and not args.quick:
        found = [p for p in DEFAULT_BASELINES if p.is_file()]
        path = found[0] if found else DEFAULT_BASELINES[0]
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"baseline checkpoint {path} not found; train it with "
                             "bench/train_baselines.py, or run with --quick")
        model, meta = prunekit.load(path)
        return model.eval(), {"checkpoint": str(path), **meta}
    torch.manual_seed(args.seed)
    model = create("resnet8", num_classes=train.num_classes, in_channels=train.in_channels, width=0.5)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.1, device=str(device), seed=args.seed, eval_every=0)
    fit(model, train, cfg)
    return model.cpu().eval(), {"checkpoint": None, "model": "resnet8 (width 0.5), trained here: "
                                "3 epochs on the quick training set"}


def _scalar_items(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def method_spec(spec: str) -> tuple[str, dict]:
    """``"curl[normalize=l2,steps=2]"`` -> ``("curl", {"normalize": "l2", "steps": 2})``."""
    if not spec.endswith("]") or "[" not in spec:
        return spec, {}
    name, _, inner = spec[:-1].partition("[")
    options: dict = {}
    for item in filter(None, (i.strip() for i in inner.split(","))):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                options[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return name, options


def part1(args, model, train, test, x, device) -> list[dict]:
    available = set(methods.available())
    rows = []
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, device=str(device), seed=args.seed,
                      eval_every=0)
    for spec in _split_methods(args.methods):
        name, extra = method_spec(spec)
        if name not in available:
            rows.append({"method": spec, "skipped": "not available in this build"})
            print(f"{spec}: skipped (not available)", flush=True)
            continue
        options: dict = {"calib_images": args.calib_images, **extra}
        method_epochs = 0.0
        if name == "autopruner":
            options.update(epochs=args.autopruner_epochs, device=str(device),
                           batch_size=min(64, args.batch_size))
            method_epochs = float(args.autopruner_epochs)
        finetune = max(0.0, args.budget_epochs - method_epochs)
        t0 = time.perf_counter()
        res = prunekit.prune(model, x, method=name, target_macs=args.target_macs, data=(train, test),
                             finetune_epochs=finetune, train_config=copy.copy(cfg), seed=args.seed,
                             **options)
        r = res.report
        row = {"method": spec, "acc_before": r.get("acc_before"), "acc_pruned": r.get("acc_pruned"),
               "acc_final": r.get("acc_final"), "macs_fraction": r["macs_fraction"],
               "params_fraction": r["params_fraction"], "method_epochs": method_epochs,
               "finetune_epochs": finetune, "seconds": time.perf_counter() - t0,
               "times": r.get("times", {}),
               "method_info": {k[len("method_"):]: v for k, v in _scalar_items(r).items()
                               if k.startswith("method_")},
               "options": options}
        rows.append(row)
        print(f"{spec}: {row['acc_pruned']:.2f}% pruned -> {row['acc_final']:.2f}% after {finetune:g} "
              f"epochs, MACs x{row['macs_fraction']:.3f}, {row['seconds']:.0f} s", flush=True)
    return rows


def _split_methods(text: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def part2(args, model, train, test, x, device) -> dict:
    small = train.subset(args.small)
    t0 = time.perf_counter()
    res = prunekit.prune(model, x, method="curl", target_macs=args.target_macs, data=small,
                         calib_images=min(args.calib_images, len(small)), seed=args.seed)
    pruned = res.model
    prune_s = time.perf_counter() - t0
    cfg = TrainConfig(lr=args.lr, batch_size=64, device=str(device), seed=args.seed)
    acc_pruned = evaluate(pruned, test)
    variants = [
        ("plain cross-entropy (no expansion)", {"expand": False, "distill": False, "refine_labels": False,
                                                "epochs": args.small_epochs * args.factor}),
        ("distillation only (no expansion)", {"expand": False, "distill": True, "refine_labels": False,
                                              "epochs": args.small_epochs * args.factor}),
        ("expansion + distillation", {"expand": True, "distill": True, "refine_labels": False,
                                      "epochs": args.small_epochs}),
        ("expansion + distillation + label refinement (CURL)",
         {"expand": True, "distill": True, "refine_labels": True, "epochs": args.small_epochs}),
    ]
    rows = []
    for label, kw in variants:
        student = copy.deepcopy(pruned)
        t = time.perf_counter()
        out = finetune_small_data(student, model, small, factor=args.factor, cfg=copy.copy(cfg),
                                  seed=args.seed, **kw)
        acc = evaluate(student, test)
        rows.append({"variant": label, **kw, "steps": out.steps, "test_acc": acc,
                     "seconds": time.perf_counter() - t, "phases": out.phases, "labels": out.labels})
        print(f"small data, {label}: {acc:.2f}% ({out.steps} steps)", flush=True)
    return {"train_images": len(small), "factor": args.factor, "prune_seconds": prune_s,
            "macs_fraction": res.report["macs_fraction"], "acc_pruned": acc_pruned,
            "acc_before": evaluate(model, test), "settings": dataclasses.asdict(cfg), "variants": rows}


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write(args, out: dict) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "learned_quick" if args.quick else "learned"
    with atomic_path(args.results / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
    m, s = out["machine"], out["settings"]
    kind = ("quick run" if args.quick else "full run" if args.train_samples is None
            and args.budget_epochs == 10 else "reduced budget, settings below")
    lines = [f"# Learned pruning: AutoPruner and CURL ({kind})", "",
             f"Baseline: {out['baseline'].get('checkpoint') or out['baseline'].get('model')}, "
             f"{DATASET}, {s['train_images']} training / {s['test_images']} test images. "
             f"Target: {s['target_macs']:.2f} of the MACs. Machine: {m['device']}, {m['cpu_count']} CPUs, "
             f"torch {m['torch']}, {m['platform']}.", ""]
    if out.get("part1"):
        lines += ["## Same MACs, same training budget", "",
                  f"Every method trains {s['budget_epochs']:g} epochs in all (AutoPruner: "
                  f"{s['autopruner_epochs']} gate-training epoch(s) + the rest fine-tuning; SGD lr "
                  f"{s['lr']}, cosine, batch {s['batch_size']}). "
                  f"Calibration: {s['calib_images']} images.", "",
                  "| method | acc before | acc pruned | acc fine-tuned | MACs kept | params kept "
                  "| method + fine-tune epochs | time (s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in out["part1"]:
            if "skipped" in r:
                lines.append(f"| {r['method']} | {r['skipped']} | | | | | | |")
                continue
            lines.append(f"| {r['method']} | {_fmt(r['acc_before'])} | {_fmt(r['acc_pruned'])} | "
                         f"{_fmt(r['acc_final'])} | {r['macs_fraction']:.3f} | {r['params_fraction']:.3f} | "
                         f"{r['method_epochs']:g} + {r['finetune_epochs']:g} | {r['seconds']:.0f} |")
        lines.append("")
    if out.get("part2"):
        p = out["part2"]
        lines += ["## Small data", "",
                  f"CURL-pruned with only {p['train_images']} training images "
                  f"(MACs x{p['macs_fraction']:.3f}; {_fmt(p['acc_before'])}% before, "
                  f"{_fmt(p['acc_pruned'])}% right after pruning), then "
                  f"fine-tuned on those images; expansion factor {p['factor']}; every variant takes the same "
                  f"number of SGD steps. Test accuracy on all {s['test_images']} test images.", "",
                  "| fine-tuning | steps | test acc | soft labels changed | time (s) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in p["variants"]:
            changed = r["labels"].get("changed")
            shown = _fmt(100 * changed, 1) + "%" if changed is not None else "-"
            lines.append(f"| {r['variant']} | {r['steps']} | {_fmt(r['test_acc'])} | {shown} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    with atomic_path(args.results / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        quick_setup(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    train, test = load(DATASET, train_samples=args.train_samples)
    if args.test_samples:
        test = test.subset(args.test_samples)
    model, meta = baseline(args, train, test, device)
    x = train.example_input(1)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(train_images=len(train), test_images=len(test))
    out: dict = {"machine": machine(device), "settings": settings,
                 "baseline": {k: v for k, v in meta.items() if isinstance(v, (int, float, str, type(None)))}}
    t0 = time.perf_counter()
    if not args.skip_part1:
        out["part1"] = part1(args, model, train, test, x, device)
        write(args, out)
    if not args.skip_part2:
        out["part2"] = part2(args, model, train, test, x, device)
    out["total_seconds"] = time.perf_counter() - t0
    write(args, out)
    print(f"wrote {args.results}/{'learned_quick' if args.quick else 'learned'}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
