"""One pruning method + fine-tuning on the ResNet-20 baseline, with bench/csgd.py's optimizer.

bench/csgd.py runs its peers one after the other after csgd; on a 2-core machine a long budget
is faster as two processes: ``bench/csgd.py --peers ""`` on one core and this script on the
other. Same settings as csgd.py's peers: target MACs (or ``--ratio``), ``--round-to``, SGD
Nesterov lr ``--lr`` cosine, batch 128, ``--calib-images`` calibration images, the full
training set, ``--seed`` (0), plain or (``--distill``) distilled fine-tuning.

Results: ``bench/results/<name>.{json,md}``.

Example
-------
    OMP_NUM_THREADS=1 .venv/bin/python bench/peer.py --method tp:l1 --epochs 10 --name peer_tp-l1_10ep
    OMP_NUM_THREADS=1 .venv/bin/python bench/peer.py --method tp:l1 --epochs 10 --round-to 8 \
        --distill --name peer_tp-l1_r8_10ep_kd
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import budget_kwargs, load_baseline, write_results  # noqa: E402

import prunekit  # noqa: E402
from prunekit.train import TrainConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="bench/baselines/resnet20_fashion-mnist.pt")
    p.add_argument("--method", default="tp:l1")
    p.add_argument("--target-macs", type=float, default=0.4)
    p.add_argument("--ratio", type=float, default=None,
                   help="remove this fraction of every layer's filters instead (as bench/csgd.py --ratio)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--calib-images", type=int, default=1000)
    p.add_argument("--round-to", type=int, default=None, help="as bench/csgd.py --round-to")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune with distillation from the unpruned model (as bench/csgd.py --distill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    model, meta, train, test = load_baseline(args.checkpoint)
    t0 = time.perf_counter()
    r = prunekit.prune(model, train.example_input(1), method=args.method, data=(train, test),
                       seed=args.seed, finetune_epochs=args.epochs,
                       train_config=TrainConfig(lr=args.lr, batch_size=128, seed=args.seed),
                       calib_images=args.calib_images, distill=args.distill,
                       **budget_kwargs(args.ratio, args.target_macs, args.round_to)).report
    row = {"method": args.method, "acc_before": r["acc_before"], "acc_pruned": r["acc_pruned"],
           "acc_final": r["acc_final"], "macs_fraction": r["macs_fraction"],
           "finetune_epochs": args.epochs, "seconds": time.perf_counter() - t0}
    print(row, flush=True)
    name = args.name or f"peer_{args.method.replace(':', '-')}_{args.epochs}ep"
    js, md = write_results(name, {"settings": {**vars(args), "meta": meta}}, [row], list(row),
                           f"{args.method} fine-tuned {args.epochs} epoch(s) on the baseline",
                           "Same optimizer, schedule and data as bench/csgd.py's peers.")
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
