"""Accuracy at equal measured latency: ``--target-latency``'s widths vs uniform ``--target-macs``
(issue #18).

ResNet-20 trained on Fashion-MNIST (``bench/baselines/resnet20_fashion-mnist.pt``) is pruned by
``l1`` two ways for each latency target ``f`` on runtime ``R`` at batch ``B``:

* **latency**: ``target_latency=f`` as the command line prunes (the widths searched against a
  latency table or model and measured end to end; ``--latency-depth``, default ``auto``: one
  residual branch per stage removed too where widths alone pay badly and that keeps 1.1x the
  MACs, the branches scored on 64 training images; results before session 22: widths alone);
* **uniform**: ``target_macs=q`` (the same fraction of every group, widths rounded to multiples
  of 8 like the latency model's and the command line's), ``q`` searched by bisection
  until its latency ratio, measured on ``R`` interleaved against the original, matches the
  latency model's own (within ``--match``; else the closest measured);
* **depth**: ``target_latency=f`` with ``latency_depth=1`` (up to one residual branch per stage
  removed whole first, scored on 64 training images; ``--add-depth`` adds it to a finished
  target); ``depth2``: with ``latency_depth=2`` (``--depth 2``, renamed by hand); ``depth-all``:
  the first such runs, before the cap per stage (any number of branches);
* **latency-r8**: ``target_latency=f`` with ``round_to=8`` given (``--round-to 8``): widths in
  multiples of 8 only, not first on the CPU's channel block (``--add-r8`` adds it to a finished
  target);
* **uniform-exact**: ``target_macs=q`` with exact widths (``round_to=1``, ``--round-to 1``),
  ``q`` bisected in the same way (``--add-exact`` adds it to a finished target): where no
  widths rounded to 8 measure near the latency model's, a uniform allocation that does;
* **uniform-under**: of the uniform allocations the bisection measured, the one keeping the
  most MACs measured at or under the latency model's ratio (what a user with that latency
  budget could deploy uniformly), where it differs from ``uniform`` (ResNet-20 rounded to 8
  has no uniform widths between 0.6 and 0.77 of the latency on an AVX-512 CPU);
  **uniform-over**: likewise the one keeping the fewest MACs measured slower than the latency
  model, where it differs from ``uniform`` (the two bracket the latency model's latency);
* **tp**: the peer, Torch-Pruning's own pruner with its L1 importance (``tp:l1``), uniform
  widths rounded to 8 bisected the same way; the one keeping the most MACs measured at or under
  the latency model's ratio (``--add-peer`` adds it to a finished target);

then the two are timed against each other (interleaved) to show the latencies match, and each is
fine-tuned with the same recipe (``--epochs`` on the first ``--train-samples`` training images,
SGD, cosine lr from ``--lr``) for every seed, and evaluated on the full test set.

Phases (the pruning one needs a quiet machine, the fine-tuning runs may run side by side):

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency_accuracy.py prune
    OMP_NUM_THREADS=1 .venv/bin/python bench/latency_accuracy.py finetune --seeds 0,1,2
    .venv/bin/python bench/latency_accuracy.py report

Pruned models are kept in ``bench/cache/latency_accuracy/``; results in
``bench/results/latency_accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULTS, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.api import finetune  # noqa: E402
from prunekit.measure.latency_table import measure_ratio  # noqa: E402
from prunekit.train import TrainConfig  # noqa: E402
from prunekit.train.loop import evaluate  # noqa: E402

BASE = Path(__file__).resolve().parent / "baselines" / "resnet20_fashion-mnist.pt"
WORK = CACHE / "latency_accuracy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("prune", "finetune", "report"))
    p.add_argument("--targets", default="0.5,0.35", help="latency fractions, comma-separated")
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--method", default="l1")
    p.add_argument("--match", type=float, default=0.02,
                   help="uniform model's measured ratio within this of the latency model's")
    p.add_argument("--measure-seconds", type=float, default=2.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--name", default="latency_accuracy")
    p.add_argument("--kinds", default=",".join(KINDS), help="finetune phase: allocations to fine-tune")
    p.add_argument("--add-depth", action="store_true",
                   help="prune phase: only add the --depth allocation to finished targets")
    p.add_argument("--depth", type=int, default=1, help="--depth of the depth allocation")
    p.add_argument("--latency-depth", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="latency_depth of the latency allocation (auto or a whole number)")
    p.add_argument("--add-r8", action="store_true",
                   help="prune phase: only add the latency-r8 allocation to finished targets")
    p.add_argument("--add-exact", action="store_true",
                   help="prune phase: only add the uniform-exact allocation to finished targets")
    p.add_argument("--add-peer", action="store_true",
                   help="prune phase: only add the Torch-Pruning (tp) allocation to finished targets")
    p.add_argument("--add-under", action="store_true",
                   help="prune phase: only add the uniform-under and -over allocations to finished targets")
    return p.parse_args(argv)


def _pruned_path(f: float, kind: str) -> Path:
    return WORK / f"f{f:g}_{kind}.pt"


def prune_phase(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    net, meta, train, test = load_baseline(BASE)
    net.eval()
    x = torch.zeros(1, *meta["input_shape"])
    WORK.mkdir(parents=True, exist_ok=True)
    for f in map(float, args.targets.split(",")):
        if args.add_depth:
            _add_latency(args, f, "depth", net, x, meta, test, latency_depth=args.depth,
                         data=train)
            continue
        if args.add_exact:
            _add_exact(args, f, net, x, meta, test)
            continue
        if args.add_r8:
            _add_latency(args, f, "latency-r8", net, x, meta, test, round_to=8)
            continue
        if args.add_peer:  # only the Torch-Pruning model, beside a finished prune phase
            _add_peer(args, f, net, x, meta, test)
            continue
        if args.add_under:  # only the uniform-under and -over models, beside a finished prune phase
            _add_under(args, f, net, x, meta, test)
            _add_under(args, f, net, x, meta, test, "over")
            continue
        t0 = time.perf_counter()
        lat = prunekit.prune(net, x, method=args.method, target_latency=f, runtime=args.runtime,
                             latency_batch_size=args.batch_size, latency_threads=1, evaluate=False,
                             data=train, latency_depth=args.latency_depth)
        lb = lat.report["latency_budget"]
        m_lat, _, _ = measure_ratio(lat.model, net, x, args.runtime, args.batch_size, 1,
                                    max_seconds=args.measure_seconds)
        print(f"[{time.perf_counter() - t0:.0f} s] f={f}: latency model measured {m_lat:.3f} "
              f"(search {lb['measured_ratio']:.3f}), MACs {lat.report['macs_fraction']:.3f}", flush=True)
        q, uni, m_uni, tries = _uniform_at(args, net, x, m_lat, round_to=8)
        head, _, _ = measure_ratio(lat.model, uni.model, x, args.runtime, args.batch_size, 1,
                                   max_seconds=args.measure_seconds)
        rec = {"target": f, "runtime": args.runtime, "batch": args.batch_size, "method": args.method,
               "latency": {"measured": m_lat, "search_measured": lb["measured_ratio"],
                           "predicted": lb["predicted_ratio"], "macs_fraction": lat.report["macs_fraction"],
                           "widths": lat.report["widths"],
                           "branches": (lb.get("depth") or {}).get("branches"),
                           "depth_auto": lb.get("depth_auto"),
                           "accuracy_pruned": evaluate(lat.model, test)},
               "uniform": {"measured": m_uni, "target_macs": q, "macs_fraction": uni.report["macs_fraction"],
                           "widths": uni.report["widths"], "tries": tries,
                           "accuracy_pruned": evaluate(uni.model, test)},
               "latency_over_uniform": head, "prune_s": time.perf_counter() - t0}
        prunekit.save(lat.model, _pruned_path(f, "latency"), meta={**meta, "pruned": "latency"})
        prunekit.save(uni.model, _pruned_path(f, "uniform"), meta={**meta, "pruned": "uniform"})
        (WORK / f"f{f:g}.json").write_text(json.dumps(rec, indent=1))
        _add_under(args, f, net, x, meta, test)
        _add_under(args, f, net, x, meta, test, "over")
        _add_peer(args, f, net, x, meta, test)
        print(f"f={f}: latency/uniform measured {head:.3f}; MACs {rec['latency']['macs_fraction']:.3f} "
              f"vs {rec['uniform']['macs_fraction']:.3f}", flush=True)


def _uniform_at(args: argparse.Namespace, net, x, m_lat: float, round_to: int,
                method: str | None = None):
    """Bisection on the uniform MACs fraction ``q`` (widths rounded to ``round_to``; pruned by
    ``method``, default ``--method``) until the pruned model's measured ratio is within
    ``--match`` of ``m_lat``; else the closest. Returns ``(q, result, measured, tries)``."""
    lo, hi, tries = 0.02, 1.0, []
    best = None
    for _ in range(10):
        q = (lo + hi) / 2
        uni = prunekit.prune(net, x, method=method or args.method, target_macs=q,
                             round_to=round_to, evaluate=False)
        m, _, _ = measure_ratio(uni.model, net, x, args.runtime, args.batch_size, 1,
                                max_seconds=args.measure_seconds)
        tries.append({"target_macs": q, "macs_fraction": uni.report["macs_fraction"], "measured": m})
        print(f"  {method or args.method} uniform (round_to {round_to}) target_macs {q:.3f}: "
              f"measured {m:.3f}", flush=True)
        if best is None or abs(m - m_lat) < abs(best[2] - m_lat):
            best = (q, uni, m)
        if abs(m - m_lat) <= args.match:
            break
        lo, hi = (q, hi) if m < m_lat else (lo, q)
    return (*best, tries)


def _add_latency(args: argparse.Namespace, f: float, kind: str, net, x, meta, test,
                 **options) -> None:
    """Add a ``target_latency=f`` allocation pruned with ``options`` (``round_to=8``:
    ``latency-r8``; ``latency_depth``: ``depth``) to the record of target ``f`` as ``kind``."""
    path = WORK / f"f{f:g}.json"
    rec = json.loads(path.read_text())
    t0 = time.perf_counter()
    res = prunekit.prune(net, x, method=args.method, target_latency=f, runtime=args.runtime,
                         latency_batch_size=args.batch_size, latency_threads=1, evaluate=False,
                         **options)
    lb = res.report["latency_budget"]
    m, _, _ = measure_ratio(res.model, net, x, args.runtime, args.batch_size, 1,
                            max_seconds=args.measure_seconds)
    branches = (lb.get("depth") or {}).get("branches")
    rec[kind] = {"measured": m, "search_measured": lb["measured_ratio"],
                 "macs_fraction": res.report["macs_fraction"], "widths": res.report["widths"],
                 **({"branches": branches} if branches is not None else {}),
                 "accuracy_pruned": evaluate(res.model, test), "prune_s": time.perf_counter() - t0}
    prunekit.save(res.model, _pruned_path(f, kind), meta={**meta, "pruned": kind})
    path.write_text(json.dumps(rec, indent=1))
    print(f"f={f}: {kind} measured {m:.3f} (search {lb['measured_ratio']:.3f}), MACs "
          f"{res.report['macs_fraction']:.3f}" + (f", branches {branches}" if branches else ""),
          flush=True)


def _add_exact(args: argparse.Namespace, f: float, net, x, meta, test) -> None:
    """Add the ``uniform-exact`` allocation (exact widths) to the record of target ``f``."""
    path = WORK / f"f{f:g}.json"
    rec = json.loads(path.read_text())
    q, uni, m, tries = _uniform_at(args, net, x, rec["latency"]["measured"], round_to=1)
    rec["uniform-exact"] = {"measured": m, "target_macs": q,
                            "macs_fraction": uni.report["macs_fraction"],
                            "widths": uni.report["widths"], "tries": tries,
                            "accuracy_pruned": evaluate(uni.model, test)}
    prunekit.save(uni.model, _pruned_path(f, "uniform-exact"), meta={**meta, "pruned": "uniform-exact"})
    path.write_text(json.dumps(rec, indent=1))
    print(f"f={f}: uniform-exact target_macs {q:.3f}: measured {m:.3f}, MACs "
          f"{rec['uniform-exact']['macs_fraction']:.3f}", flush=True)


def _add_peer(args: argparse.Namespace, f: float, net, x, meta, test) -> None:
    """Add the ``tp`` allocation to the record of target ``f``: Torch-Pruning's own pruner with
    its L1 importance (``tp:l1``), uniform widths rounded to 8, its MACs fraction bisected like
    ``uniform``'s; of the measured tries, the one keeping the most MACs at or under the latency
    model's measured ratio (the peer within the same budget), else the fastest."""
    path = WORK / f"f{f:g}.json"
    rec = json.loads(path.read_text())
    mine = rec["latency"]["measured"]
    _q, _res, _m, tries = _uniform_at(args, net, x, mine, round_to=8, method="tp:l1")
    within = [t for t in tries if t["measured"] <= mine]
    best = (max(within, key=lambda t: t["macs_fraction"]) if within
            else min(tries, key=lambda t: t["measured"]))
    peer = prunekit.prune(net, x, method="tp:l1", target_macs=best["target_macs"], round_to=8,
                          evaluate=False)
    m, _, _ = measure_ratio(peer.model, net, x, args.runtime, args.batch_size, 1,
                            max_seconds=args.measure_seconds)
    rec["tp"] = {"measured": m, "target_macs": best["target_macs"],
                 "macs_fraction": peer.report["macs_fraction"], "widths": peer.report["widths"],
                 "tries": tries, "accuracy_pruned": evaluate(peer.model, test)}
    prunekit.save(peer.model, _pruned_path(f, "tp"), meta={**meta, "pruned": "tp"})
    path.write_text(json.dumps(rec, indent=1))
    print(f"f={f}: tp target_macs {best['target_macs']:.3f}: measured {m:.3f}, "
          f"MACs {rec['tp']['macs_fraction']:.3f}", flush=True)


def _add_under(args: argparse.Namespace, f: float, net, x, meta, test, side: str = "under") -> None:
    """Add the ``uniform-under`` (``side="under"``) or ``uniform-over`` allocation to the record
    of target ``f`` (see the module docstring): pruned again at its ``q`` (the same widths) and
    measured."""
    path = WORK / f"f{f:g}.json"
    rec = json.loads(path.read_text())
    mine = rec["latency"]["measured"]
    if side == "under":
        tries = [t for t in rec["uniform"]["tries"] if t["measured"] <= mine]
        pick = max
    else:
        tries = [t for t in rec["uniform"]["tries"] if t["measured"] > mine]
        pick = min
    if not tries:
        return
    best = pick(tries, key=lambda t: t["macs_fraction"])
    if best["macs_fraction"] == rec["uniform"]["macs_fraction"]:
        return
    kind = f"uniform-{side}"
    uni = prunekit.prune(net, x, method=args.method, target_macs=best["target_macs"], round_to=8,
                         evaluate=False)
    m, _, _ = measure_ratio(uni.model, net, x, args.runtime, args.batch_size, 1,
                            max_seconds=args.measure_seconds)
    rec[kind] = {"measured": m, "target_macs": best["target_macs"],
                 "macs_fraction": uni.report["macs_fraction"],
                 "widths": uni.report["widths"], "accuracy_pruned": evaluate(uni.model, test)}
    prunekit.save(uni.model, _pruned_path(f, kind), meta={**meta, "pruned": kind})
    path.write_text(json.dumps(rec, indent=1))
    print(f"f={f}: {kind} target_macs {best['target_macs']:.3f}: measured {m:.3f}, "
          f"MACs {rec[kind]['macs_fraction']:.3f}", flush=True)


KINDS = ("latency", "latency-r8", "uniform", "uniform-exact", "uniform-under", "uniform-over", "tp",
         "depth", "depth2", "depth-all")


def _run_path(f: float, kind: str, seed: int | str, epochs: int) -> Path:
    """One fine-tuning run's result (the first runs, of 2 epochs, have no epoch suffix)."""
    return WORK / f"f{f:g}_{kind}_seed{seed}{'' if epochs == 2 else f'_ep{epochs}'}.json"


def finetune_phase(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _net, _meta, train, test = load_baseline(BASE)
    train = train.subset(args.train_samples)
    for f in map(float, args.targets.split(",")):
        rec = json.loads((WORK / f"f{f:g}.json").read_text())
        for seed in map(int, args.seeds.split(",")):
            for kind in (k for k in args.kinds.split(",") if k in rec):
                out = _run_path(f, kind, seed, args.epochs)
                if out.is_file():
                    continue
                model, _ = prunekit.load(_pruned_path(f, kind))
                cfg = TrainConfig(lr=args.lr, batch_size=128)
                secs = finetune(model, train, args.epochs, train_config=cfg, seed=seed)
                acc = evaluate(model, test)
                out.write_text(json.dumps({"target": f, "kind": kind, "seed": seed, "accuracy": acc,
                                           "seconds": secs, "epochs": args.epochs,
                                           "train_samples": args.train_samples, "lr": args.lr}))
                print(f"f={f} {kind} seed {seed}: {acc:.2f} % ({secs:.0f} s)", flush=True)


def report_phase(args: argparse.Namespace) -> None:
    rows = []
    for f in map(float, args.targets.split(",")):
        rec = json.loads((WORK / f"f{f:g}.json").read_text())
        for kind in (k for k in KINDS if k in rec):
            runs = sorted((r for r in (json.loads(p.read_text())
                                       for p in WORK.glob(_run_path(f, kind, "*", args.epochs).name))
                           if r["epochs"] == args.epochs), key=lambda r: r["seed"])
            if not runs:
                continue
            accs = [r["accuracy"] for r in runs]
            rows.append({"target": f, "allocation": kind, "runtime": rec["runtime"], "batch": rec["batch"],
                         "macs_fraction": rec[kind]["macs_fraction"], "measured_ratio": rec[kind]["measured"],
                         "latency_over_uniform": rec["latency_over_uniform"],
                         "acc_pruned": rec[kind]["accuracy_pruned"],
                         "acc_finetuned_mean": statistics.mean(accs) if accs else None,
                         "acc_finetuned_std": statistics.stdev(accs) if len(accs) > 1 else None,
                         "seeds": len(accs), "accs": accs,
                         "epochs": runs[0]["epochs"] if runs else None,
                         "train_samples": runs[0]["train_samples"] if runs else None})
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "phase"}, "base": str(BASE.name),
               "pruning": {f"f{r['target']:g}": json.loads((WORK / f"f{r['target']:g}.json").read_text())
                           for r in rows}}
    write_results(args.name, payload, rows,
                  ["target", "allocation", "runtime", "batch", "macs_fraction", "measured_ratio",
                   "latency_over_uniform", "acc_pruned", "acc_finetuned_mean", "acc_finetuned_std",
                   "seeds", "epochs", "train_samples"],
                  "Accuracy at equal measured latency: --target-latency vs uniform --target-macs",
                  notes="ResNet-20 on Fashion-MNIST (" + BASE.name + "), pruned by l1. measured_ratio: "
                        "latency over the original's on the runtime, interleaved; latency_over_uniform: "
                        "the latency model timed against the uniform one (1.0 = equal). Accuracy on the "
                        "full test set after the same fine-tuning per seed. Commands: `OMP_NUM_THREADS=1 "
                        "python bench/latency_accuracy.py prune` (quiet machine), `... finetune "
                        "--seeds 0,1,2`, `... report`.")
    print((RESULTS / f"{args.name}.md").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    {"prune": prune_phase, "finetune": finetune_phase, "report": report_phase}[args.phase](args)


if __name__ == "__main__":
    main()
