"""The tables of docs/runtimes.md "Measured" from a bench/runtimes.py result (issue #18).

Usage: ``python bench/runtimes_summary.py [bench/results/runtimes.json ...]`` (the rows of
every file given, e.g. one run's models split over two files); prints Markdown:
the default prune against exact widths, the ``--target-latency`` matrix (the bench's re-timed
median, in brackets the search's accepted value, * outside [f - 0.05, f]) and the counts the
issue's goals ask for.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

MODELS = {"resnet20": "ResNet-20 (28x28)", "resnet18": "ResNet-18", "mobilenetv2": "MobileNetV2"}
RUNTIMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def default_table(rows: list[dict]) -> list[str]:
    """Uniform 50 % of the MACs: exact widths against the default rounding, per batch."""
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if r.get("setting", "").startswith("uniform") and r.get("latency_ratio") is not None:
            cells[(r["model"], r["setting"], r["runtime"])][r["batch"]] = r
    out = ["| model | setting | runtime | batch 1 | batch 16 | batch 64 | efficiency at 64 |",
           "|---|---|---|---|---|---|---|"]
    for (model, setting, rt), by_batch in cells.items():
        first = next(iter(by_batch.values()))
        what = "exact widths" if "exact" in setting else setting.split("MACs, ")[-1].replace(
            "round_to", "rounded to")
        lat = []
        for b in (1, 16, 64):
            r = by_batch.get(b)
            x = "" if r is None else f"{r['latency_ratio']:.2f}x"
            lat.append(f"**{x} (slower)**" if r is not None and r["latency_ratio"] > 1 else x)
        eff = f"{by_batch[64]['efficiency']:.2f}" if 64 in by_batch else ""
        out.append(f"| {MODELS.get(model, model)} | {first['macs_ratio'] * 100:.0f}% MACs, {what} "
                   f"| {RUNTIMES.get(rt, rt)} | {' | '.join(lat)} | {eff} |")
    return out


def target_table(rows: list[dict]) -> tuple[list[str], dict[str, list[bool]]]:
    """The --target-latency matrix and, per model, whether each reachable target landed."""
    cells: dict[tuple, dict] = defaultdict(dict)
    landed: dict[str, list[bool]] = defaultdict(list)
    targets: list[float] = []
    for r in rows:
        if "target" not in r:
            continue
        if r["target"] not in targets:
            targets.append(r["target"])
        if "error" in r:
            m = re.search(r"measured ([0-9.]+)", r["error"])
            cells[(r["model"], r["runtime"], r["batch"])][r["target"]] = \
                f"below reach ({m.group(1) if m else '?'})"
            continue
        star = "" if r.get("in_window") else " *"
        eff = f", eff. {r['efficiency']:.2f}" if r["batch"] > 1 or r["model"] != "resnet20" else ""
        cells[(r["model"], r["runtime"], r["batch"])][r["target"]] = (
            f"{r['latency_ratio']:.3f} ({r['search_measured']:.3f}), MACs {r['macs_ratio']:.2f}"
            f"{eff}{star}")
        landed[r["model"]].append(bool(r.get("in_window")))
    out = ["| model | runtime, batch | " + " | ".join(str(t) for t in targets) + " |",
           "|---|---|" + "---|" * len(targets)]
    for key in sorted(cells, key=lambda k: (list(MODELS).index(k[0]) if k[0] in MODELS else 9,
                                            k[2], k[1])):
        model, rt, b = key
        out.append(f"| {MODELS.get(model, model)} | {RUNTIMES.get(rt, rt)}, {b} | "
                   + " | ".join(cells[key].get(t, "") for t in targets) + " |")
    return out, landed


def main(argv: list[str] | None = None) -> None:
    paths = [Path(p) for p in (argv or sys.argv[1:] or ["bench/results/runtimes.json"])]
    rows = [row for path in paths for row in json.loads(path.read_text())["rows"]]
    print("\n".join(default_table(rows)), "\n")
    table, landed = target_table(rows)
    print("\n".join(table), "\n")
    for model, hits in landed.items():
        print(f"{MODELS.get(model, model)}: {sum(hits)} of {len(hits)} reachable targets "
              "within [f - 0.05, f]")
    best: dict[tuple, float] = {}
    for r in rows:
        if "target" in r and r.get("batch") == 64 and r.get("efficiency") is not None:
            k = (r["model"], r["target"])
            best[k] = max(best.get(k, 0.0), r["efficiency"])
    for (model, t), e in sorted(best.items()):
        print(f"best efficiency at batch 64: {MODELS.get(model, model)} at {t}: {e:.2f}")


if __name__ == "__main__":
    main()
