"""Figures of a comparison, as PNG bytes (matplotlib's Agg canvas; pyplot is never imported,
so the caller's backend and global figure state are left alone).

Every function takes the ``results`` dict written by :func:`prunekit.report.compare` (or a
part of it) and returns ``None`` when it has nothing to draw.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["accuracy_vs_macs", "bn_factor_histograms", "merge_dendrogram", "layer_widths",
           "method_colors", "figures", "plot_factor_histograms", "plot_layer_widths"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def _save(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` atomically, in the format of the file's suffix (PNG, PDF, SVG ...)."""
    from ..utils import atomic_path

    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)


def _ok(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [e for e in results.get("methods", []) if e.get("status") == "ok"]


def method_colors(results: Mapping[str, Any]) -> dict[str, str]:
    """One colour per method, by its position in the comparison (the same in every figure)."""
    return {e["method"]: _PALETTE[i % len(_PALETTE)] for i, e in enumerate(results.get("methods", []))}


def _spread(values: list[float], gap: float) -> list[float]:
    """Label positions near ``values`` that are at least ``gap`` apart (order kept)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = list(values)
    for a, b in zip(order, order[1:], strict=False):
        out[b] = max(out[b], out[a] + gap)
    shift = (max(out) - max(values)) / 2 if values else 0.0  # centre the block on the data
    return [v - shift for v in out]


def accuracy_vs_macs(results: Mapping[str, Any]) -> bytes | None:
    """Left: test accuracy against the MACs kept (filled marker: final accuracy; hollow: right
    after pruning, joined by a line; star: the original). Right: the same accuracies as bars,
    on an axis zoomed to the final accuracies, which a shared budget puts close together."""
    entries = [e for e in _ok(results) if e.get("acc_final") is not None]
    if not entries:
        return None
    colors = method_colors(results)
    fig = _figure(11.5, 4.8)
    ax, bx = fig.subplots(1, 2, width_ratios=[1.35, 1])
    acc0 = results.get("original", {}).get("acc")
    if acc0 is not None:
        ax.scatter([100.0], [acc0], marker="*", s=220, color="black", zorder=4, label="original")
        ax.axhline(acc0, color="black", lw=0.8, ls=":", zorder=1)
    for e in entries:
        x = 100.0 * e["macs_fraction"]
        c = colors[e["method"]]
        if e.get("acc_pruned") is not None and e["acc_pruned"] != e["acc_final"]:
            ax.plot([x, x], [e["acc_pruned"], e["acc_final"]], color=c, lw=1.2, alpha=0.6, zorder=2)
            ax.scatter([x], [e["acc_pruned"]], s=45, facecolors="white", edgecolors=c, zorder=3)
        ax.scatter([x], [e["acc_final"]], s=60, color=c, zorder=3, label=e["method"])
    lows = [e["acc_pruned"] for e in entries if e.get("acc_pruned") is not None]
    highs = [e["acc_final"] for e in entries] + ([acc0] if acc0 is not None else [])
    lo, hi = min(lows + highs), max(highs)
    ax.set_ylim(lo - 0.06 * (hi - lo + 1), hi + 0.12 * (hi - lo + 1))
    y0, y1 = ax.get_ylim()
    labels = _spread([e["acc_final"] for e in entries], 0.055 * (y1 - y0))
    for e, y in zip(entries, labels, strict=True):
        x = 100.0 * e["macs_fraction"]
        ax.annotate(e["method"], (x, e["acc_final"]), xytext=(x + 9, y), textcoords="data",
                    fontsize=8, color=colors[e["method"]], va="center",
                    arrowprops={"arrowstyle": "-", "color": colors[e["method"]], "lw": 0.6,
                                "alpha": 0.7})
    target = results.get("settings", {}).get("target_macs")
    if target is not None:
        ax.axvline(100.0 * target, color="grey", lw=0.8, ls="--", zorder=1)
        ax.annotate("target", (100.0 * target, 0.02), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("MACs kept (% of the original)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs MACs (filled: final; hollow: right after pruning)", fontsize=10)
    ax.set_xlim(0, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    pos = np.arange(len(entries))
    finals = [e["acc_final"] for e in entries]
    bx.barh(pos, finals, height=0.6, color=[colors[e["method"]] for e in entries])
    for p, e in zip(pos, entries, strict=True):
        after = e.get("acc_pruned")
        text = f"{e['acc_final']:.2f}" + (f"  (right after pruning {after:.2f})"
                                           if after is not None and after != e["acc_final"] else "")
        bx.annotate(text, (e["acc_final"], p), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ref = finals + ([acc0] if acc0 is not None else [])
    left = min(ref) - max(2.0, 0.6 * (max(ref) - min(ref)))
    bx.set_xlim(left, max(ref) + 1.3 * (max(ref) - left))
    if acc0 is not None:
        bx.axvline(acc0, color="black", lw=0.8, ls=":")
        bx.annotate("original", (acc0, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=8)
    bx.set_yticks(pos, [e["method"] for e in entries], fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("final test accuracy (%), zoomed")
    bx.set_title("Final accuracy (bars start at the left edge)", fontsize=10)
    bx.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def _short(name: str) -> str:
    return name.replace("layer", "L").replace("features", "f").replace(".conv", ".c")


def layer_widths(results: Mapping[str, Any]) -> bytes | None:
    """Small multiples, one row per method: every conv / linear layer's original width (grey)
    and the width kept (the method's colour)."""
    entries = [e for e in _ok(results) if e.get("widths")]
    if not entries:
        return None
    colors = method_colors(results)
    layers = list(entries[0]["widths"])
    n = len(entries)
    width = min(16.0, max(7.5, 0.22 * len(layers) + 2.5))
    fig = _figure(width, 1.25 * n + 1.6)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    pos = np.arange(len(layers))
    top = max(max(w[0] for w in e["widths"].values()) for e in entries)
    for ax, e in zip(axes, entries, strict=True):
        before = [e["widths"].get(layer, [0, 0])[0] for layer in layers]
        after = [e["widths"].get(layer, [0, 0])[1] for layer in layers]
        ax.bar(pos, before, color="#dddddd", width=0.8, label="original")
        ax.bar(pos, after, color=colors[e["method"]], width=0.8, label="kept")
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel("ch.", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.text(0.005, 0.96, f"{e['method']}  (MACs {100 * e['macs_fraction']:.1f}%)",
                transform=ax.transAxes, va="top", fontsize=9, color=colors[e["method"]],
                fontweight="bold")
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xticks(pos, [_short(layer) for layer in layers], rotation=90, fontsize=7)
    axes[0].set_title("Output channels per layer: original (grey) and kept", fontsize=10)
    return _png(fig)


def merge_dendrogram(tree: Mapping[str, Any], method: str) -> bytes | None:
    """The merge tree of one clustered layer (``figures["dendrogram"]`` of an entry whose
    method clusters filters, e.g. centripetal SGD).

    Links merged into the kept clusters (the first ``channels - clusters`` merges of the
    agglomerative clustering, which is exactly what the method merges) are red, the rest grey.
    """
    from scipy.cluster.hierarchy import dendrogram

    z = np.asarray(tree.get("linkage", []), dtype=np.float64)
    c, k = int(tree.get("channels", 0)), int(tree.get("clusters", 0))
    if z.ndim != 2 or z.shape[0] != c - 1 or c < 2:
        return None
    merged = c - k
    # the first c - k merges of the tree are the agglomerative clusters the method merged;
    # with another clustering ("even", "kmeans") the tree only shows the similarity structure
    agglomerative = tree.get("clustering", "agglomerative") == "agglomerative"

    def color(link: int) -> str:
        return "#d62728" if agglomerative and link - c < merged else "#9a9a9a"

    fig = _figure(min(16.0, max(7.5, 0.14 * c + 2)), 4.4)
    ax = fig.add_subplot()
    dendrogram(z, ax=ax, link_color_func=color, leaf_font_size=6,
               labels=[str(i) for i in range(c)])
    ax.set_ylabel("1 - Pearson similarity of survey vectors")
    ax.set_xlabel("channel")
    ax.set_title(f"{method}: survey-similarity dendrogram of {tree.get('layer')}\n"
                 f"{c} channels -> {k} clusters ("
                 + ("red: merged into one filter; " if agglomerative
                    else f"clustered with {tree.get('clustering')}, not this tree; ")
                 + f"{tree.get('survey_samples')} survey images)", fontsize=10)
    return _png(fig)


def bn_factor_histograms(results: Mapping[str, Any]) -> bytes | None:
    """Histogram of the BatchNorm scale factors after sparsity training, one panel per
    slimming / MRTS method that recorded them (all prunable groups pooled)."""
    entries = [e for e in _ok(results) if (e.get("figures") or {}).get("bn_factors")]
    if not entries:
        return None
    colors = method_colors(results)
    fig = _figure(7.5, 2.6 * len(entries) + 0.6)
    axes = fig.subplots(len(entries), 1, squeeze=False)[:, 0]
    for ax, e in zip(axes, entries, strict=True):
        data = e["figures"]["bn_factors"]
        values = np.abs(np.concatenate([np.asarray(v, dtype=np.float64).ravel()
                                        for v in data["factors"].values()]))
        ax.hist(values, bins=60, color=colors[e["method"]], alpha=0.85)
        ax.set_yscale("log")
        if data.get("threshold") is not None:
            ax.axvline(float(data["threshold"]), color="black", ls="--", lw=1, label="cut")
            ax.legend(fontsize=8)
        ax.set_title(f"{e['method']}: |BN scale factors| after sparsity training "
                     f"({values.size} channels)", fontsize=10)
        ax.set_xlabel("|gamma|")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_ylabel("channels")
    return _png(fig)


def figures(results: Mapping[str, Any]) -> list[tuple[str, str, bytes]]:
    """Every figure the results support, as ``(file name, caption, png bytes)``."""
    out: list[tuple[str, str, bytes]] = []
    png = accuracy_vs_macs(results)
    if png is not None:
        out.append(("accuracy_vs_macs.png", "Test accuracy against the MACs kept; right: the final "
                                                  "accuracies on a zoomed axis", png))
    png = layer_widths(results)
    if png is not None:
        out.append(("layer_widths.png", "Output channels kept per layer, per method", png))
    for e in _ok(results):
        tree = (e.get("figures") or {}).get("dendrogram")
        if tree:
            png = merge_dendrogram(tree, e["method"])
            if png is not None:
                out.append((f"dendrogram_{e['slug']}.png",
                            f"{e['method']}: survey-similarity dendrogram of {tree.get('layer')}", png))
    png = bn_factor_histograms(results)
    if png is not None:
        out.append(("bn_factors.png", "BatchNorm scale factors after sparsity training", png))
    return out


# ------------------------------------------------------------ figures of bench scripts
def plot_factor_histograms(factors: Mapping[str, torch.Tensor | Sequence[torch.Tensor] | Sequence[float]],
                           path: str | os.PathLike, *, bins: int = 60, log: bool = True,
                           title: str | None = None) -> None:
    """One figure, one panel per method: histogram of the scale factors after S1.

    Parameters
    ----------
    factors : mapping
        Method name -> factors (a tensor, a list of per-layer tensors or a list of floats).
    path : path
        Output image (PNG, PDF, SVG ... by suffix), written atomically.
    bins : int
        Bins over the common range of all methods.
    log : bool
        Logarithmic count axis (the near-zero mode is usually much taller).
    title : str, optional
    """
    from ..methods.slimming import separation

    flat = {k: _flatten(v) for k, v in factors.items()}
    if not flat:
        raise ConfigError("no factors to plot")
    top = max(float(v.max()) for v in flat.values() if v.numel()) if any(
        v.numel() for v in flat.values()) else 1.0
    edges = np.linspace(0.0, max(top, 1e-6), bins + 1).tolist()
    fig = _figure(4.2 * len(flat), 3.4)
    axes = fig.subplots(1, len(flat), sharex=True, squeeze=False)
    for i, (ax, (name, v)) in enumerate(zip(axes[0], flat.items(), strict=True)):
        ax.hist(v.numpy(), bins=edges, color=f"C{i}", log=log)
        ax.set_title(f"{name} (n={v.numel()}, sep={separation(v):.2f})")
        ax.set_xlabel("|gamma| (BN scale factor)")
    axes[0][0].set_ylabel("channels")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_layer_widths(widths: Mapping[str, Mapping[str, Sequence[int]]], path: str | os.PathLike, *,
                      title: str | None = None) -> None:
    """Per-layer widths after pruning, one bar series per method.

    Parameters
    ----------
    widths : mapping
        Method name -> ``{layer: (channels before, channels after)}`` (the ``widths`` of a
        :func:`prunekit.prune` report). Layers are shown in the first method's order; the
        original widths are drawn as a grey outline.
    path : path
        Output image, written atomically.
    title : str, optional
    """

    if not widths:
        raise ConfigError("no widths to plot")
    first = next(iter(widths.values()))
    layers = [n for n, (before, _) in first.items() if before > 0]
    x = np.arange(len(layers))
    k = len(widths)
    w = 0.8 / k
    fig = _figure(max(6.0, 0.32 * len(layers) + 2), 3.8)
    ax = fig.subplots()
    ax.bar(x, [first[n][0] for n in layers], width=0.9, color="none", edgecolor="0.6", label="original")
    for i, (name, per) in enumerate(widths.items()):
        ax.bar(x - 0.4 + w * (i + 0.5), [per.get(n, (0, 0))[1] for n in layers], width=w, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)


def _flatten(v: torch.Tensor | Sequence[torch.Tensor] | Sequence[float]) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().abs().double().flatten().cpu()
    items = list(v)
    if items and isinstance(items[0], torch.Tensor):
        return torch.cat([t.detach().abs().double().flatten().cpu() for t in items])
    return torch.as_tensor(items, dtype=torch.float64).abs()
