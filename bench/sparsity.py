"""Sparsity-training benchmark (seed 003's ablation): network slimming vs MRTS on ResNet-20.

Both methods get the same sparsity-training budget (epochs, learning rate, batch, data) on the
same trained baseline; then:

* ``mrts@natural``: MRTS's own cut, the layer thresholds of eq. 11 at ``delta`` (no budget);
* ``slimming@f`` and ``mrts@f``: each cut to keep at most ``f`` of the MACs, for every ``f`` of
  ``--budgets`` and for the MACs MRTS reached on its own;
* ``tp:bn-scale@f``: Torch-Pruning's BN-scale pruner (global ranking) on the slimming-trained
  model, at MRTS's MACs;

every cut fine-tuned with the same budget. The summary compares the MACs each method keeps at
equal accuracy (the smallest MACs among a method's runs whose final accuracy is within
``--tolerance`` points of MRTS's natural cut; the paper: slimming ~55 %, MRTS ~41 % of the
FLOPs). Also written: the histogram of the BN factors after sparsity training (baseline,
slimming, MRTS) and the per-layer widths.

    .venv/bin/python bench/sparsity.py --checkpoint bench/baselines/resnet20_fashion-mnist.pt
    .venv/bin/python bench/sparsity.py --quick          # smoke test on a tiny model
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.data import load  # noqa: E402
from prunekit.engine import analyse  # noqa: E402
from prunekit.methods import slimming  # noqa: E402
from prunekit.models import create  # noqa: E402
from prunekit.report import plots  # noqa: E402
from prunekit.train import TrainConfig, evaluate, fit  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(CACHE.parent / "baselines" / "resnet20_fashion-mnist.pt"))
    p.add_argument("--sparsity-epochs", type=int, default=5, help="S1 epochs, both methods")
    p.add_argument("--sparsity-lr", type=float, default=0.01)
    p.add_argument("--slim-lambda", type=float, default=None,
                   help="slimming's L1 weight (default: prunekit's 'auto' for the S1 schedule)")
    p.add_argument("--mrts-lambda", type=float, default=None,
                   help="MRTS's regulariser weight (default: 'auto', the same as slimming's)")
    p.add_argument("--tau", type=float, default=1.5)
    p.add_argument("--delta", type=float, default=1e-3)
    p.add_argument("--scope", default="layer", choices=["layer", "network"])
    p.add_argument("--budgets", default="0.41,0.55", help="MACs fractions for both methods")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--train-samples", type=int, default=None,
                   help="train (S1 and fine-tuning) on the first N training images")
    p.add_argument("--tolerance", type=float, default=0.3, help="accuracy points for 'equal accuracy'")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sparsity")
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test")
    return p.parse_args(argv)


def quick_setup(args: argparse.Namespace):
    train, test = load("fashion-mnist", train_samples=512)
    torch.manual_seed(args.seed)
    model = create("resnet8", num_classes=10, in_channels=1)
    fit(model, train, TrainConfig(epochs=1, lr=0.05, batch_size=64, eval_every=0))
    args.sparsity_epochs, args.finetune_epochs, args.budgets = 1, 1, "0.5"
    return model, {"note": "quick: resnet8, 512 images, 1 epoch"}, train, test.subset(256)


def checkpoint_path(path: str) -> str:
    """``bench/baselines/resnet20_fashion-mnist.pt`` or train_baselines.py's ``resnet20_fashion-mnist.pt``."""
    p = Path(path)
    alt = p.with_name(f"{p.stem}_fashion-mnist{p.suffix}")
    return str(alt) if not p.is_file() and alt.is_file() else str(p)


def sparsity_phase(base, train, test, kind: str, lam: float | None, args,
                   cfg: TrainConfig) -> dict[str, Any]:
    """S1 on a copy of ``base``; returns the trained copy, its factors and facts."""
    model = copy.deepcopy(base)
    info = analyse(model, train.example_input(1))
    opts = slimming.SparsityOptions(sparsity=lam, tau=args.tau, scope=args.scope,
                                    sparsity_epochs=args.sparsity_epochs)
    lam = slimming.resolve_sparsity(opts, info, cfg, len(train))
    reg = slimming.make_regulariser(info, kind, opts, lam)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    result = slimming.sparsity_train(model, train, reg, cfg)
    seconds = time.perf_counter() - t0
    factors = slimming.group_factors(info)
    flat = torch.cat(list(factors.values()))
    return {"model": model, "factors": factors,
            "facts": {"regulariser": kind, "lambda": lam, "seconds": seconds,
                      "acc_after_s1": evaluate(model, test),
                      "loss_last_epoch": result.history[-1]["loss"] if result.history else None,
                      "separation": slimming.separation(flat),
                      "share_below_1e-2": float((flat < 1e-2).double().mean()),
                      "natural_removed_fraction": slimming.removed_fraction(
                          factors, slimming.threshold_widths(factors, args.delta))}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.quick:
        base, meta, train, test = quick_setup(args)
        out = Path("/tmp/prunekit-bench-quick")
    else:
        base, meta, train, test = load_baseline(checkpoint_path(args.checkpoint),
                                                train_samples=args.train_samples)
        out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    example = train.example_input(1)
    acc0 = evaluate(base, test)
    s1_cfg = TrainConfig(epochs=args.sparsity_epochs, lr=args.sparsity_lr, batch_size=args.batch_size,
                         seed=args.seed, eval_every=0,
                         max_steps_per_epoch=10 if args.quick else None)
    ft_cfg = TrainConfig(lr=args.finetune_lr, batch_size=args.batch_size, seed=args.seed,
                         max_steps_per_epoch=10 if args.quick else None)
    print(f"baseline accuracy {acc0:.2f}", flush=True)

    phases = {}
    for method, kind, lam in (("slimming", "l1", args.slim_lambda),
                              ("mrts", "polarization", args.mrts_lambda)):
        phases[method] = sparsity_phase(base, train, test, kind, lam, args, s1_cfg)
        f = phases[method]["facts"]
        print(f"S1 {method}: lambda {f['lambda']:.3g}  acc {f['acc_after_s1']:.2f}  "
              f"separation {f['separation']:.3f}  "
              f"below 1e-2 {f['share_below_1e-2']:.2f}  ({f['seconds']:.0f} s)", flush=True)
    base_factors = slimming.group_factors(analyse(base, example))
    plots.plot_factor_histograms(
        {"baseline": list(base_factors.values()),
         "slimming (L1)": list(phases["slimming"]["factors"].values()),
         "MRTS (polarisation)": list(phases["mrts"]["factors"].values())},
        out / f"{args.name}_factors.png",
        title=f"BN scale factors after {args.sparsity_epochs} epochs of sparsity training")

    rows: list[dict[str, Any]] = []
    widths: dict[str, Any] = {}

    def run(label: str, method: str, sparse: str, **budget_and_opts: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = prunekit.prune(phases[sparse]["model"], example, method=method, data=(train, test),
                             finetune_epochs=args.finetune_epochs, train_config=ft_cfg,
                             seed=args.seed, sparsity_epochs=0, **budget_and_opts)
        r = res.report
        row = {"run": label, "method": method, "s1": phases[sparse]["facts"]["regulariser"],
               "acc_s1": r["acc_before"], "acc_pruned": r["acc_pruned"], "acc_final": r["acc_final"],
               "macs_fraction": r["macs_fraction"], "params_fraction": r["params_fraction"],
               "removed_channels": r.get("method_removed_channel_fraction"),
               "delta_used": r.get("method_delta_used"), "fallback": r.get("method_fallback"),
               "seconds": time.perf_counter() - t0,
               "extra": {k: v for k, v in r.items() if k.startswith("method_")
                         and k not in ("method_thresholds",)}}
        rows.append(row)
        widths[label] = r["widths"]
        print(f"{label:22s} MACs {row['macs_fraction']:.3f}  pruned {row['acc_pruned']:.2f}  "
              f"final {row['acc_final']:.2f}", flush=True)
        return row

    natural = run("mrts@natural", "mrts", "mrts", ratio=1e-3, adaptive=True, delta=args.delta)
    m_nat = round(natural["macs_fraction"] + 5e-4, 3)
    budgets = sorted({float(b) for b in args.budgets.split(",")} | {m_nat}, reverse=True)
    for f in budgets:
        if not 0 < f < 1:
            continue
        run(f"slimming@{f:.3f}", "slimming", "slimming", target_macs=f)
        if f != m_nat:
            run(f"mrts@{f:.3f}", "mrts", "mrts", target_macs=f, delta=args.delta)
    if 0 < m_nat < 1:
        run(f"tp:bn-scale@{m_nat:.3f}", "tp:bn-scale", "slimming", target_macs=m_nat, global_ranking=True)

    ref = natural["acc_final"]

    def best(method: str) -> dict[str, Any] | None:
        ok = [r for r in rows if r["method"] == method and r["acc_final"] >= ref - args.tolerance]
        return min(ok, key=lambda r: r["macs_fraction"]) if ok else None

    summary = {"reference_accuracy": ref, "tolerance": args.tolerance, "baseline_accuracy": acc0}
    for method in ("mrts", "slimming", "tp:bn-scale"):
        b = best(method)
        summary[f"{method}_macs_at_equal_accuracy"] = b["macs_fraction"] if b else None
        summary[f"{method}_run"] = b["run"] if b else None
    at_equal = {k: v for k, v in summary.items() if k.endswith("equal_accuracy")}
    print(f"equal accuracy (final >= {ref - args.tolerance:.2f}): {at_equal}", flush=True)

    pair = [lbl for lbl in (f"slimming@{m_nat:.3f}", "mrts@natural") if lbl in widths]
    plots.plot_layer_widths({lbl: widths[lbl] for lbl in pair}, out / f"{args.name}_widths.png",
                               title=f"Per-layer widths at {m_nat:.1%} of the MACs")
    settings = {k: v for k, v in vars(args).items()} | {"baseline_meta": meta}
    payload = {"settings": settings, "summary": summary,
               "sparsity_training": {m: p["facts"] for m, p in phases.items()},
               "figures": [str(out / f"{args.name}_factors.png"), str(out / f"{args.name}_widths.png")]}
    cols = ["run", "s1", "acc_s1", "acc_pruned", "acc_final", "macs_fraction", "params_fraction",
            "removed_channels", "delta_used", "fallback", "seconds"]
    s1 = "; ".join(f"{m}: lambda {p['facts']['lambda']:.3g}, S1 acc {p['facts']['acc_after_s1']:.2f}, "
                   f"separation {p['facts']['separation']:.3f}, share of factors < 1e-2 "
                   f"{p['facts']['share_below_1e-2']:.2f}" for m, p in phases.items())
    notes = (f"Baseline accuracy {acc0:.2f} %. Same sparsity training for both methods "
             f"({args.sparsity_epochs} epochs, lr {args.sparsity_lr}); every cut fine-tuned "
             f"{args.finetune_epochs} epochs. {s1}. MACs kept at equal accuracy (final accuracy "
             f">= {ref - args.tolerance:.2f}): MRTS {summary['mrts_macs_at_equal_accuracy']}, "
             f"slimming {summary['slimming_macs_at_equal_accuracy']}, Torch-Pruning BN-scale "
             f"{summary['tp:bn-scale_macs_at_equal_accuracy']} (the paper: slimming ~0.55, "
             "MRTS ~0.41). Figures: " + ", ".join(Path(f).name for f in payload["figures"]) + ".")
    js, md = write_results(args.name, payload, rows, cols,
                           "Network slimming vs MRTS (same sparsity-training budget)", notes, out)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
