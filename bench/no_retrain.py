"""Benchmark: pruning without retraining (``method="reconstruct"``) against today's reconstruction
methods and Torch-Pruning's criteria followed by BatchNorm re-estimation.

Each trained baseline (``--bases``, default the committed 30- and 10-epoch ResNet-20 on
Fashion-MNIST) is pruned to each MACs budget (``--budgets``: fractions REMOVED, default 30, 40,
50 and 60 % fewer MACs) by every recipe, with ``--calib-images`` (1,000) calibration images drawn
from the training set and NO fine-tuning; accuracy is measured on the full test set (10,000
images). Every run is a separate process (fork): wall time and its peak resident memory are
its own. The second model, ``--bases vgg16bn --budgets 0.67``, is the Taylor benchmark's
VGG-16-BN at one third of the MACs (trained into ``bench/cache/`` when missing).

Recipes:

* ``reconstruct``: the default recipe (labels never read);
* ``reconstruct+distill``: the same, then ``--distill-steps`` (500) label-free distillation steps
  on the calibration images (reported apart: gradient steps, its own time);
* ``reconstruct-uniform``: the default recipe with a uniform ratio (ablation of the widths);
* ``csgd-no-train``: C-SGD's survey + clustering, one channel per cluster, least-squares refit;
* ``lasso``, ``thinet``: today's methods (``--calib-images`` images);
* ``tp:l1+bn``, ``tp:taylor+bn``, ``tp:bn-scale+bn``: Torch-Pruning's criteria, then BatchNorm
  statistics re-estimated on the calibration images (``tp:taylor`` reads their labels for its
  gradients).

Ablations of the default recipe (``--recipes``): ``reconstruct+bn`` (BatchNorm re-estimated),
``reconstruct-refit-damage`` (damage curves without the output probes), ``reconstruct-lasso``
(LASSO selection instead of backward elimination), ``reconstruct-no-trunk`` (residual trunks
left whole).

Usage::

    OMP_NUM_THREADS=1 python bench/no_retrain.py
    OMP_NUM_THREADS=1 python bench/no_retrain.py --bases 30ep --budgets 0.5,0.6 --recipes reconstruct,lasso
    OMP_NUM_THREADS=1 python bench/no_retrain.py --quick     # smoke test, a few minutes

Results: ``bench/results/no_retrain.json`` and ``.md`` (rows are appended as they finish, so an
interrupted run keeps what it measured; ``--resume`` skips rows already there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.data import load as load_data  # noqa: E402
from prunekit.train import evaluate  # noqa: E402

BASES = {"30ep": "bench/baselines/resnet20_fashion-mnist_30ep.pt",
         "10ep": "bench/baselines/resnet20_fashion-mnist.pt",
         # the second model: VGG-16-BN of the Taylor benchmark (59 MB, not committed; trained
         # here when missing, see VGG_RECIPE), run at one third of the MACs:
         # --bases vgg16bn --budgets 0.67
         "vgg16bn": "bench/cache/vgg16_bn.pt"}
#: how bench/cache/vgg16_bn.pt is made when missing (taylor_vgg.baseline: seed 0, ~25 min on one core)
VGG_RECIPE = ["--train-epochs", "3", "--train-samples", "12000", "--train-lr", "0.01"]
RECIPES = ("reconstruct", "reconstruct+distill", "reconstruct-uniform", "csgd-no-train", "lasso",
           "thinet", "tp:l1+bn", "tp:taylor+bn", "tp:bn-scale+bn")
#: ablations of the default recipe, run on request (``--recipes``)
ABLATIONS = ("reconstruct+bn", "reconstruct-refit-damage", "reconstruct-lasso", "reconstruct-no-trunk")


def recipe_call(recipe: str, args: argparse.Namespace) -> tuple[str, dict[str, Any], bool]:
    """(method, options, re-estimate BatchNorm afterwards) of a recipe."""
    calib = {"calib_images": args.calib_images}
    if recipe == "reconstruct":
        return "reconstruct", calib, False
    if recipe == "reconstruct+distill":
        return "reconstruct", {**calib, "distill_steps": args.distill_steps}, False
    if recipe == "reconstruct-uniform":
        return "reconstruct", {**calib, "widths": "uniform"}, False
    if recipe == "reconstruct+bn":
        return "reconstruct", {**calib, "recalibrate_bn": True}, False
    if recipe == "reconstruct-refit-damage":
        return "reconstruct", {**calib, "damage": "refit"}, False
    if recipe == "reconstruct-lasso":
        return "reconstruct", {**calib, "selection": "lasso"}, False
    if recipe == "reconstruct-no-trunk":
        return "reconstruct", {**calib, "prune_trunk": False}, False
    if recipe == "csgd-no-train":
        return "reconstruct", {**calib, "selection": "clusters"}, False
    if recipe in ("lasso", "thinet"):
        return recipe, calib, False
    if recipe.endswith("+bn"):
        peer = recipe[:-3]
        return peer, (calib if peer == "tp:taylor" else {}), True
    raise SystemExit(f"error: unknown recipe {recipe!r}; choose from {', '.join(RECIPES + ABLATIONS)}")


def _data(args: argparse.Namespace):
    """Fashion-MNIST train (calibration) and test sets (the first ``--test-samples``)."""
    train, test = load_data("fashion-mnist")
    return train, (test.subset(args.test_samples) if args.test_samples else test)


def _run(conn, base: str, recipe: str, removed: float, args: argparse.Namespace) -> None:
    """One recipe in a child process; sends back its row."""
    torch.set_num_threads(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, _ = prunekit.load(args.base_paths[base])
    train, test = _data(args)
    method, opts, bn = recipe_call(recipe, args)
    t0 = time.perf_counter()
    res = prunekit.prune(model.eval(), data=train, method=method, target_macs=round(1 - removed, 4),
                         evaluate=False, seed=args.seed, **opts)
    pruned = res.model
    if bn:
        from prunekit.data.batches import select
        from prunekit.train.bn import recalibrate_bn

        images = select(train, args.calib_images, 64, generator=torch.Generator().manual_seed(args.seed))
        recalibrate_bn(pruned, images, samples=len(images))
    seconds = time.perf_counter() - t0
    distill = res.report.get("method_distill") or {}
    row = {"base": base, "removed": removed, "recipe": recipe, "macs": res.report["macs_fraction"],
           "params": res.report["params_fraction"],
           "acc": evaluate(pruned.eval(), test), "seconds": seconds,
           "distill_s": distill.get("seconds"),
           "no_gradient_s": res.report.get("method_no_gradient_s"),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_start_mb": rss0 / 1024, "labels_read": recipe in ("tp:taylor+bn",)}
    conn.send(row)
    conn.close()


def run_one(base: str, recipe: str, removed: float, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_run, args=(child, base, recipe, removed, args))
    p.start()
    child.close()
    try:
        row = parent.recv()
    except EOFError:
        row = {"base": base, "removed": removed, "recipe": recipe, "error": f"exit {p.exitcode}"}
    p.join()
    return row


def base_accuracy(base: str, args: argparse.Namespace) -> float:
    model, _ = prunekit.load(args.base_paths[base])
    _, test = _data(args)
    return evaluate(model.eval(), test)


def pivot(rows: list[dict[str, Any]], bases: dict[str, float]) -> str:
    """Accuracy (%) by recipe (rows) and base x budget (columns), as Markdown."""
    ok = [r for r in rows if "error" not in r]
    cols = sorted({(r["base"], r["removed"]) for r in ok}, key=lambda c: (c[0] != "30ep", c[1]))
    recipes = list(dict.fromkeys(r["recipe"] for r in ok))
    acc = {(r["recipe"], r["base"], r["removed"]): r["acc"] for r in ok}
    head = ["recipe"] + [f"{b} ({bases[b]:.2f}), {100 * x:.0f}% fewer" for b, x in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in recipes:
        cells = [f"{acc[(name, b, x)]:.2f}" if (name, b, x) in acc else "" for b, x in cols]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], bases: dict[str, float], args: argparse.Namespace) -> None:
    table = []
    for r in rows:
        if "error" in r:
            table.append({**r})
            continue
        table.append({"base": f"{r['base']} ({bases[r['base']]:.2f})",
                      "fewer MACs": f"{100 * r['removed']:.0f}%",
                      "recipe": r["recipe"], "acc": round(r["acc"], 2),
                      "drop": round(r["acc"] - bases[r["base"]], 2), "MACs kept": round(r["macs"], 3),
                      "params kept": round(r["params"], 3), "seconds": round(r["seconds"], 1),
                      "distill s": None if r.get("distill_s") is None else round(r["distill_s"], 1),
                      "peak RSS MB": round(r["peak_rss_mb"]),
                      "labels read": "yes" if r["labels_read"] else "no"})
    notes = pivot(rows, bases) + "\n\n" + (
             "No fine-tuning on labelled data. Accuracy (%) on the full Fashion-MNIST test set "
             f"({args.test_samples or 10000} images); {args.calib_images} calibration images from the "
             "training set; one process per run (peak RSS is that process's maximum resident memory, "
             "the loaded data set included); `seconds`: the whole prune call (plus the BatchNorm "
             "re-estimation for `+bn`), distillation included where there is one. These runs shared the "
             "2 cores with other jobs (load average 2-8): the seconds are upper bounds; "
             "`no_retrain_quiet.md` times the default recipe on a nearly idle machine. The VGG-16-BN "
             "base (`vgg16bn`) is the Taylor benchmark's, trained 3 epochs on 12,000 images "
             "(84.85 %), pruned to one third of its MACs.\n\n"
             "Commands (each row records its own): " + "; ".join(
                 f"`OMP_NUM_THREADS=1 python bench/no_retrain.py {a}`"
                 for a in dict.fromkeys(r.get("argv", "") for r in rows)))
    write_results(args.name, {"settings": {k: v for k, v in vars(args).items() if k != "base_paths"},
                              "base_accuracy": bases},
                  table, ["base", "fewer MACs", "recipe", "acc", "drop", "MACs kept", "params kept",
                          "seconds", "distill s", "peak RSS MB", "labels read"],
                  "Pruning without retraining (ResNet-20 and VGG-16-BN, Fashion-MNIST)", notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default="30ep,10ep", help="comma list of: " + ", ".join(BASES))
    p.add_argument("--budgets", default="0.3,0.4,0.5,0.6", help="fractions of the MACs removed")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--calib-images", type=int, default=1000)
    p.add_argument("--distill-steps", type=int, default=500)
    p.add_argument("--distill-budgets", default="0.5,0.6",
                   help="budgets at which reconstruct+distill runs (it is the slow one)")
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="no_retrain")
    p.add_argument("--resume", action="store_true", help="keep the rows of an earlier run")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the Markdown/JSON from the rows already measured")
    p.add_argument("--quick", action="store_true",
                   help="30ep base, 50%%, three recipes, 200 calibration and 1,000 test images")
    args = p.parse_args(argv)
    if args.quick:
        args.bases, args.budgets, args.recipes = "30ep", "0.5", "reconstruct,lasso,tp:l1+bn"
        args.calib_images, args.test_samples, args.name = 200, 1000, args.name + "_quick"
    args.base_paths = {k: str(Path(__file__).resolve().parent.parent / v) for k, v in BASES.items()}
    bases = [b for b in args.bases.split(",") if b]
    for b in bases:
        if b not in BASES:
            raise SystemExit(f"error: unknown base {b!r}; choose from {', '.join(BASES)}")
    if "vgg16bn" in bases and not Path(args.base_paths["vgg16bn"]).is_file():
        import taylor_vgg

        print("training the VGG-16-BN base (taylor_vgg " + " ".join(VGG_RECIPE) + ")", flush=True)
        taylor_vgg.baseline(taylor_vgg.parse_args(["--checkpoint", args.base_paths["vgg16bn"], *VGG_RECIPE]),
                            *load_data("fashion-mnist"))
    budgets = [float(b) for b in args.budgets.split(",")]
    distill_budgets = {float(b) for b in args.distill_budgets.split(",")}
    recipes = [r for r in args.recipes.split(",") if r]
    for r in recipes:
        recipe_call(r, args)
    out = RESULTS / f"{args.name}.json"
    rows: list[dict[str, Any]] = []
    if args.resume and out.is_file():
        rows = [r for r in json.loads(out.read_text())["rows_raw"]]
    if args.render_only:
        data = json.loads(out.read_text())
        rows, accs = data["rows_raw"], data["base_accuracy"]
        args.__dict__.update({k: v for k, v in data["settings"].items() if k not in ("render_only",)})
        render(rows, accs, args)
        _keep_raw(out, rows)
        return
    accs = {b: base_accuracy(b, args) for b in sorted(set(bases) | {r["base"] for r in rows})}
    done = {(r["base"], r["removed"], r["recipe"]) for r in rows}
    for b in bases:
        for removed in budgets:
            for recipe in recipes:
                if recipe == "reconstruct+distill" and removed not in distill_budgets:
                    continue
                if (b, removed, recipe) in done:
                    continue
                row = run_one(b, recipe, removed, args)
                row["argv"] = " ".join(sys.argv[1:])
                rows.append(row)
                print(json.dumps(row), flush=True)
                render(rows, accs, args)
                _keep_raw(out, rows)


def _keep_raw(path: Path, rows: list[dict[str, Any]]) -> None:
    """The raw rows beside the rendered ones (for ``--resume``)."""
    data = json.loads(path.read_text())
    data["rows_raw"] = rows
    path.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    mp.set_start_method("fork", force=True)
    main()
