"""Does the filter-norm scale of a pruned network explain csgd's fine-tuning gap? A check.

A convolution followed by BatchNorm is scale-invariant: multiplying a filter by ``s`` (and the
BN running mean by ``s``, the running variance by ``s**2``) leaves the network's outputs as they
were, but changes the step plain SGD takes relative to the weights (about ``1 / s**2``). The
csgd merge *sums* consumer input slices, L1 pruning *drops* them, so csgd's merged network has
larger filters (about 0.83-0.95 of the original norms vs 0.6-0.8 after L1, ResNet-20 at 40% of
the MACs) and could simply fine-tune more slowly. This script prunes the ResNet-20 baseline,
rescales every BN-followed conv filter (outputs unchanged), fine-tunes with the same recipe as
``bench/csgd.py`` and reports the final accuracy:

- ``--method csgd --mode rms``: after 1 centripetal epoch and the merge, every filter rescaled to
  the per-element RMS of its original layer (what an L1-pruned filter keeps);
- ``--method tp:l1 --mode scale:1.3``: the opposite, L1's filters made 1.3x larger.

Compare with the unscaled runs (``bench/csgd.py --epochs 3 --split-epochs 1 --split-only
--round-to 8 --peers tp:l1``). Appends a row to ``bench/results/norm_rescale.{json,md}``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/norm_rescale.py --method csgd --mode rms --ft 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/norm_rescale.py --method tp:l1 --mode scale:1.3 --ft 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.methods.csgd import _following_bn  # noqa: E402
from prunekit.train import TrainConfig, evaluate, fit  # noqa: E402


def rescale(net: nn.Module, original: nn.Module, example: torch.Tensor, mode: str) -> None:
    """Rescale every conv filter that feeds a BatchNorm, keeping the outputs (eval mode)."""
    before = dict(original.named_modules())
    names = {m: n for n, m in net.named_modules()}
    pairs = _following_bn(net, example, [m for m in net.modules() if isinstance(m, nn.Conv2d)])
    with torch.no_grad():
        for conv, bn in pairs.items():
            w = conv.weight
            if mode == "rms":  # per output filter, to the original layer's mean per-element RMS
                target = before[names[conv]].weight.flatten(1).pow(2).mean(1).sqrt().mean()
                s = target / w.flatten(1).pow(2).mean(1).sqrt()
            else:
                s = torch.full((w.shape[0],), float(mode.split(":", 1)[1]))
            w.mul_(s.view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.mul_(s)
            bn.running_mean.mul_(s)
            bn.running_var.mul_(s * s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist.pt")
    p.add_argument("--method", default="csgd", help="csgd (1 centripetal epoch) or a one-shot/tp method")
    p.add_argument("--mode", default="rms", help='"rms" or "scale:<factor>"')
    p.add_argument("--ft", type=int, default=2, help="fine-tuning epochs after the rescale")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.mode != "rms" and not args.mode.startswith("scale:"):
        raise SystemExit('--mode must be "rms" or "scale:<factor>"')
    warnings.simplefilter("ignore")
    model, meta, train, test = load_baseline(args.checkpoint)
    x = train.example_input(1)
    cfg = TrainConfig(lr=args.lr, batch_size=128, seed=args.seed)
    t0 = time.perf_counter()
    kw = (dict(centripetal_epochs=1, lr=args.lr, batch_size=128) if args.method == "csgd"
          else dict(calib_images=1000))
    net = prunekit.prune(model, x, method=args.method, data=(train, test), seed=args.seed,
                         target_macs=args.target_macs, round_to=args.round_to, train_config=cfg,
                         **kw).model
    acc_pruned = evaluate(net, test)
    rescale(net, model, x, args.mode)
    acc_rescaled = evaluate(net, test)
    fit(net, train, dataclasses.replace(cfg, epochs=args.ft))
    row = {"method": args.method, "mode": args.mode, "train_epochs": args.ft + (args.method == "csgd"),
           "acc_pruned": acc_pruned, "acc_rescaled": acc_rescaled, "acc_final": evaluate(net, test),
           "seconds": time.perf_counter() - t0}
    print(json.dumps(row), flush=True)
    path = RESULTS / "norm_rescale.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if (r["method"], r["mode"]) != (row["method"], row["mode"])] + [row]
    write_results("norm_rescale", {"settings": {**vars(args), "meta": meta}}, rows, list(row),
                  "Filter-norm rescaling before fine-tuning (outputs unchanged)",
                  f"See bench/norm_rescale.py's docstring; lr {args.lr} cosine, batch 128, seed "
                  f"{args.seed}, full Fashion-MNIST, widths rounded to {args.round_to} at "
                  f"{args.target_macs:.0%} of the MACs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
