"""Shared pieces of the benchmark scripts: the machine, the baseline, results files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.data import load
from prunekit.measure.timing import LAYOUTS, compare_latency
from prunekit.utils import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / "cache"


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_baseline(path: str | os.PathLike, data: str = "fashion-mnist",
                  train_samples: int | None = None):
    """(model, meta, train, test) for a checkpoint written by bench/train_baselines.py."""
    model, meta = prunekit.load(path)
    train, test = load(data, train_samples=train_samples)
    return model, meta, train, test


def budget_kwargs(ratio: float | None, target_macs: float | None,
                  round_to: int | None = None) -> dict[str, Any]:
    """``prunekit.prune``'s budget keywords: ``ratio`` when given, else ``target_macs``, and
    ``round_to`` when given."""
    budget: dict[str, Any] = {"ratio": ratio} if ratio is not None else {"target_macs": target_macs}
    if round_to is not None:
        budget["round_to"] = round_to
    return budget


def latency_ratios(original, pruned, example, batch_sizes: Sequence[int] = (1, 64),
                   layouts: Sequence[str] = LAYOUTS, max_seconds: float = 3.0,
                   rounds: int = 1) -> dict[str, Any]:
    """Pruned / original median latency, timed back to back, per batch size and layout
    (nchw, channels_last, deploy = channels_last with BatchNorm folded); with ``rounds`` > 1
    each setting is measured that many times and the median ratio is kept (shared machines
    are noisy), with every round's ratio listed."""
    out: dict[str, Any] = {}
    for b in batch_sizes:
        for layout in layouts:
            runs = [compare_latency(original, pruned, example, b, layout, max_seconds=max_seconds)
                    for _ in range(rounds)]
            r = sorted(runs, key=lambda run: run["ratio"])[len(runs) // 2]
            out[f"b{b}_{layout}"] = {"original_ms": r["median_ms_a"], "pruned_ms": r["median_ms_b"],
                                     "ratio": r["ratio"], "rounds": [run["ratio"] for run in runs]}
    return out


def write_results(name: str, payload: dict[str, Any], table: list[dict[str, Any]],
                  columns: Sequence[str], title: str, notes: str = "",
                  out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``name``.json (everything) and ``name``.md (a table + machine + settings)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload, "rows": table}
    js = out_dir / f"{name}.json"
    with atomic_path(js) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# {title}", "", notes, "" if notes else "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    lines += ["", "Settings: `" + json.dumps(payload.get("settings", {})) + "`", "",
              "Machine: `" + json.dumps(payload["machine"]) + "`", ""]
    md = out_dir / f"{name}.md"
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(lines))
    return js, md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)
