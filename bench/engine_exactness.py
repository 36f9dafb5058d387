"""Is the surgery exact on real architectures? (issue #17, item 2: grouped convs, channel-last
blocks, attention left alone).

For each torchvision model (and GhostNet from timm, whose concatenated depthwise copies tie two
trunk channels into one unit; random weights; a zero-initialised Linear, such as ViT's head, gets
small random weights so that outputs are not all zero, and ConvNeXt's layer scales, 1e-6 at
initialisation, are set to 0.5 so that the blocks' outputs count), ``prunekit.prune(model, x, "l1",
ratio=0.3, skip_unsupported=True)`` gives a plan; the groups of the plan without a LayerNorm /
GroupNorm over their channels (which normalise across channels, so removing a channel is not
the same as silencing it) are applied to the original model, and the result is compared with
the original whose consumers' input columns for the removed channels are zeroed
(:func:`prunekit.testing.fuzz.zero_removed_inputs`; grouped convs zeroed within each group's
block). Equal outputs mean the surgery removed exactly the planned channels everywhere: in
every group of a grouped conv, in depthwise convs, through concatenations, flatten and
permutes. Also recorded: groups (and how many are tied into units by grouped convs), layers
left unpruned, the MACs kept, seconds and the peak RSS of the process.

Run in the vision environment (``make setup-vision``)::

    OMP_NUM_THREADS=1 .venv-vision/bin/python bench/engine_exactness.py
    .venv-vision/bin/python bench/engine_exactness.py --only resnext50_32x4d@64

Writes ``bench/results/engine_exactness.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

MODELS = ("resnext50_32x4d@64", "regnet_x_400mf@64", "regnet_y_400mf@64", "convnext_tiny@64",
          "mobilenet_v2@64", "densenet121@64", "efficientnet_b0@64", "vit_b_16@224",
          "swin_t@224", "timm:ghostnet_100@64")
OUT = Path(__file__).resolve().parent / "results"


def check(name: str, size: int) -> dict:
    import torchvision

    import prunekit
    from prunekit.engine import PruningPlan, analyse, apply_plan
    from prunekit.testing.fuzz import zero_removed_inputs

    torch.manual_seed(0)
    if ":" in name:  # a model spec (timm:ghostnet_100, hf:convnext ...)
        from prunekit.models import build

        model = build(name).eval()
    else:
        model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.abs().max() == 0:
                nn.init.normal_(m.weight, std=0.02)
        for pname, p in model.named_parameters():  # ConvNeXt's 1e-6 layer scale would hide
            if pname.endswith("layer_scale"):       # every block's contribution
                p.fill_(0.5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    res = prunekit.prune(model, x[:1], method="l1", ratio=0.3, skip_unsupported=True)
    prune_s = time.perf_counter() - t0
    info = analyse(model, x[:1], skip_unsupported=True, ignore_classifier=False)
    normed = {g.name for g in info.groups
              if any(isinstance(s.module, (nn.LayerNorm, nn.GroupNorm)) for s in g.channelwise)}
    tied = sum(1 for g in info.groups if g.units is not None)
    plan = PruningPlan([gp for gp in res.plan if gp.group not in normed])
    pruned = apply_plan(model, x[:1], plan)
    zeroed = zero_removed_inputs(model, x[:1], plan)
    with torch.no_grad():
        a, b = pruned(x), zeroed(x)
    return {"model": name, "input": [3, size, size], "groups": len(info.groups),
            "groups_tied_by_grouped_convs": tied, "planned": len(res.plan),
            "checked": len(plan), "max_rel_diff": float((a - b).abs().max() / b.abs().max()),
            "macs_fraction": res.report["macs_fraction"],
            "left_unpruned": sorted({r["layer"] for r in res.report["skipped_unsupported"]}),
            "prune_s": round(prune_s, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def markdown(rows: list[dict], settings: dict) -> str:
    lines = ["# Surgery exactness on real architectures", "",
             f"Command: `{settings['command']}`  ", f"Machine: {settings['machine']}; "
             f"torch {settings['torch']}, torchvision {settings['torchvision']}; "
             "l1, ratio 0.3, skip_unsupported=True, random weights, float32.", "",
             "| model | input | groups (tied) | checked / planned | max rel. diff | MACs kept "
             "| left unpruned | prune s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | {r['error']} | | | | |")
            continue
        first = r["left_unpruned"][:1]
        left = f"{len(r['left_unpruned'])}" + (f" ({first[0]} ...)" if first else "")
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['groups']} "
                     f"({r['groups_tied_by_grouped_convs']}) | {r['checked']} / {r['planned']} "
                     f"| {r['max_rel_diff']:.1e} | {r['macs_fraction']:.3f} | {left} "
                     f"| {r['prune_s']} | {r['peak_rss_mib']} |")
    lines += ["", "Groups with a LayerNorm / GroupNorm over their channels are pruned but not in "
              "this check (removing a channel changes the normalisation statistics).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated NAME@SIZE entries")
    parser.add_argument("--update", action="store_true",
                        help="keep the earlier rows of the models not run now")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import torchvision

    entries = args.only.split(",") if args.only else list(MODELS)
    rows = []
    for entry in entries:
        name, size = entry.split("@")
        try:
            rows.append(check(name, int(size)))
        except Exception as exc:  # recorded, not hidden
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    command = ("OMP_NUM_THREADS=1 .venv-vision/bin/python bench/engine_exactness.py"
               + (f" --only {args.only}" if args.only else "") + (" --update" if args.update else ""))
    previous = OUT / "engine_exactness.json"
    if args.update and previous.is_file():
        earlier = json.loads(previous.read_text())
        done = {r["model"] for r in rows}
        rows = [r for r in earlier["rows"] if r["model"] not in done] + rows
        command = f"{earlier['settings']['command']}; then {command}"
    settings = {"command": command,
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                           f"{torch.get_num_threads()} torch thread",
                "torch": torch.__version__, "torchvision": torchvision.__version__}
    OUT.mkdir(exist_ok=True)
    (OUT / "engine_exactness.json").write_text(json.dumps({"settings": settings, "rows": rows},
                                                          indent=2) + "\n")
    (OUT / "engine_exactness.md").write_text(markdown(rows, settings))


if __name__ == "__main__":
    main()
