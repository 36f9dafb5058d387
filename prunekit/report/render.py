"""Rendering a comparison: ``report.md`` (figures as PNG files beside it), one self-contained
``report.html`` (figures embedded as ``data:`` URIs, inline CSS, no external resource) and a
plain-text table for the terminal.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..measure.latency_depth import describe
from ..utils import atomic_path
from .plots import figures

__all__ = ["table", "render_markdown", "render_html", "text_table", "write_report"]

_LAYOUT = {"nchw": "nchw", "channels_last": "cl", "deploy": "dep"}

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1180px;color:#222;line-height:1.4;padding:0 12px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;
 border-bottom:1px solid #ddd;padding-bottom:.2em}
p.meta{color:#555;margin:.2em 0}
table{border-collapse:collapse;font-size:13px;margin:12px 0;width:100%}
div.wide{overflow-x:auto}
th,td{border:1px solid #d0d0d0;padding:4px 6px;text-align:right;white-space:nowrap}
th{background:#f0f3f7;font-weight:600;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}td.failed{color:#b00020;text-align:left;white-space:normal}
ul.notes{font-size:13px;color:#444}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #e4e4e4}
figcaption{font-size:13px;color:#555}
table.kv{width:auto;font-size:12px}table.kv th{text-align:left;vertical-align:top}
table.kv td{text-align:left;white-space:normal;word-break:break-word;font-family:monospace}
"""


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------

def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _size(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def _epochs(e: Mapping[str, Any]) -> str:
    b = e.get("budget") or {}
    if not b:
        return "–"
    text = f"{b['method_epochs']:g}+{b['finetune_epochs']}/{b['epochs']}"
    return text + " over" if b.get("over_budget") else text


def _latency_cell(e: Mapping[str, Any], key: str) -> str:
    per = (e.get("latency") or {}).get(key)
    if not per:
        return "–"
    best = per["best"]
    return f"{per[best]['ratio']:.2f}× {_LAYOUT.get(best, best)}"


def _ort_cell(e: Mapping[str, Any], key: str) -> str:
    onnx = e.get("onnx")
    if not onnx:
        return "–"
    if "error" in onnx:
        return "failed"
    rec = onnx["latency"].get(key)
    if not rec:
        return "–"
    ratio = f" ({rec['ratio']:.2f}×)" if rec.get("ratio") is not None else ""
    return f"{rec['pruned_ms']:.2f} ms{ratio}"


def _batch_keys(results: Mapping[str, Any]) -> list[str]:
    return [f"b{b}" for b in results.get("settings", {}).get("batch_sizes", [1, 64])]


def table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]], list[bool]]:
    """The comparison table: ``(headers, rows, failed)``; cells are plain text.

    Latency columns hold pruned / original median latency, timed back to back in the same
    layout, for the layout in which the pruned model is fastest (``nchw``, ``cl`` =
    channels_last, or ``dep`` = deploy: channels_last with BatchNorm folded into the convs);
    ORT columns hold the pruned model's ONNX Runtime latency and its ratio to the original's.
    """
    keys = _batch_keys(results)
    onnx = bool(results.get("settings", {}).get("onnx"))
    headers = ["method", "acc before", "acc pruned", "acc final", "MACs %", "params %"]
    headers += [f"latency {k}" for k in keys]
    if onnx:
        headers += [f"ORT {k}" for k in keys]
    headers += ["file size", "epochs own+ft/B", "wall time"]
    rows, failed = [], []
    orig_size = results.get("original", {}).get("checkpoint", {}).get("file_size_bytes")
    for e in results.get("methods", []):
        if e.get("status") != "ok":
            rows.append([e["method"], f"failed: {e.get('error', '')}"])
            failed.append(True)
            continue
        size = e["checkpoint"]["file_size_bytes"]
        share = f" ({100 * size / orig_size:.0f}%)" if orig_size else ""
        row = [e["method"], _pct(e.get("acc_before")), _pct(e.get("acc_pruned")),
               _pct(e.get("acc_final")), _pct(100 * e["macs_fraction"], 1),
               _pct(100 * e["params_fraction"], 1)]
        row += [_latency_cell(e, k) for k in keys]
        if onnx:
            row += [_ort_cell(e, k) for k in keys]
        row += [_size(size) + share, _epochs(e), _duration(e.get("wall_s"))]
        rows.append(row)
        failed.append(False)
    return headers, rows, failed


def _summary(results: Mapping[str, Any]) -> list[str]:
    """Lines describing what was compared, under which budgets, on which machine."""
    s = results.get("settings", {})
    o = results.get("original", {})
    m = results.get("machine", {})
    meta = s.get("meta") or {}
    arch = (o.get("arch") or {}).get("name") if isinstance(o.get("arch"), dict) else None
    model = meta.get("model") or arch or o.get("model", "model")
    train, test = s.get("train_data") or {}, s.get("test_data") or {}
    if s.get("target_latency") is not None:
        budget = (f"at most {100 * s['target_latency']:.0f}% of the original's latency on "
                  f"{s.get('runtime')} at batch {s.get('latency_batch_size', 1)} (measured)")
        if s.get("latency_depth") == "auto":
            budget += (", one whole residual branch per stage removed too where that keeps "
                       "1.1x the MACs of widths alone (tried where widths pay badly)")
        elif s.get("latency_depth"):
            budget += (f", up to {s['latency_depth']} whole residual branch(es) per stage removed "
                       f"before widths are cut")
    elif s.get("target_macs") is not None:
        budget = f"at most {100 * s['target_macs']:.0f}% of the MACs"
    else:
        budget = f"{100 * s['ratio']:.0f}% of the filters removed per layer"
    lines = [
        f"Model: {model}" + (f" ({meta['checkpoint']})" if meta.get("checkpoint") else "")
        + f", {_count(o.get('macs'))} MACs, {_count(o.get('params'))} params, test accuracy "
        f"{_pct(o.get('acc'))}%, checkpoint {_size(o.get('checkpoint', {}).get('file_size_bytes'))}.",
        f"Data: {train.get('name', '–')}, {train.get('samples', '–')} training images for "
        f"calibration and training, {test.get('samples', '–')} test images for the accuracies.",
        f"Budget: {budget}; {s.get('budget_epochs', 0)} training epoch(s) per method in total "
        f"(the method's own training counts against it, the rest is fine-tuning"
        f"{' with distillation' if s.get('distill') else ''}); seed {s.get('seed')}.",
        f"Machine: {m.get('cpu') or 'unknown CPU'}, {m.get('torch_threads')} torch thread(s)"
        + (f" ({s['threads']} for the latencies)" if s.get("threads") else "") + ", "
        f"torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}; {m.get('date')}.",
    ]
    return lines


def _notes(results: Mapping[str, Any]) -> list[str]:
    """Footnotes: how to read the columns, and what happened to each method."""
    keys = _batch_keys(results)
    notes = [
        "acc before / pruned / final: test accuracy (%) of the original, of the pruned model right "
        "after pruning, and after fine-tuning; MACs %, params %: what the pruned model keeps of the "
        "original's.",
        f"latency {'/'.join(keys)}: pruned / original median CPU latency (PyTorch, batch "
        f"{', '.join(k[1:] for k in keys)}), timed back to back in the same memory layout; shown "
        "for the layout in which the pruned model is fastest (nchw; cl = channels_last; dep = "
        "deploy, channels_last with BatchNorm folded into the convs, as inference runtimes do). "
        "Below 1 is faster.",
    ]
    if results.get("settings", {}).get("onnx"):
        notes.append("ORT: the pruned model's median ONNX Runtime latency, and its ratio to the "
                     "original's timed right before it.")
    notes.append("epochs own+ft/B: epochs the method trained by itself + fine-tuning epochs, out of "
                 "the budget B (\"over\": the method alone exceeded B and was not fine-tuned).")
    if results.get("skipped"):
        notes.append(f"Reused from an earlier run (same settings): {', '.join(results['skipped'])}.")
    for method, why in (results.get("redone") or {}).items():
        notes.append(f"{method} was run again: {why}.")
    for e in results.get("methods", []):
        if e.get("status") != "ok":
            notes.append(f"{e['method']} FAILED ({e.get('error_type', 'error')}): {e.get('error')}")
            continue
        b = e.get("budget") or {}
        if b.get("over_budget"):
            notes.append(f"{e['method']} trained {b['method_epochs']:g} epoch(s) by itself, more than "
                         f"the budget of {b['epochs']}.")
        if b.get("fitted_options"):
            fitted = ", ".join(f"{k}={v}" for k, v in b["fitted_options"].items())
            notes.append(f"{e['method']}: options set by the comparison: {fitted}.")
        depth_line = describe(e.get("latency_budget") or {})
        if depth_line:
            notes.append(f"{e['method']}: {depth_line}.")
        if e.get("onnx") and "error" in e["onnx"]:
            notes.append(f"{e['method']}: ONNX export failed: {e['onnx']['error']}")
        for w in e.get("warnings", []):
            prefix = f"{e['method']}: "
            notes.append(f"{e['method']} warned: {w[len(prefix):] if w.startswith(prefix) else w}")
    return notes


# ---------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Mapping[str, Any], images: Sequence[tuple[str, str]] = ()) -> str:
    """``report.md``: summary, table, notes, then the figures as links to PNG files.

    Parameters
    ----------
    results : dict
        As returned by :func:`prunekit.report.compare`.
    images : sequence of (file name, caption)
        PNG files written next to the report.
    """
    headers, rows, failed = table(results)
    lines = [f"# {results.get('title', 'Pruning methods compared')}", ""]
    lines += [f"- {line}" for line in _summary(results)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row, bad in zip(rows, failed, strict=True):
        cells = row + [""] * (len(headers) - len(row)) if bad else row
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    speed = runtime_lines(results)
    if speed:
        lines += ["", "Speed on the deployment runtimes:", "", "```", *speed, "```"]
    lines += ["", "Notes:", ""] + [f"- {_md_cell(n)}" for n in _notes(results)]
    if images:
        lines += ["", "## Figures", ""]
        for name, caption in images:
            lines += [f"![{caption}]({name})", "", f"*{caption}* ([{name}]({name}))", ""]
    lines += ["## Files", "", "- `results.json`: every number, the settings and the machine",
              "- `methods/<method>.json`: one method's result (the resume points)",
              "- `<method>.pt` / `<method>.onnx`: the pruned checkpoint (with its plan) and its "
              "ONNX export; `original.pt` / `original.onnx`: the original", ""]
    return "\n".join(lines)


def render_html(results: Mapping[str, Any], images: Sequence[tuple[str, str, bytes]] = ()) -> str:
    """``report.html``: one self-contained page (inline CSS, figures as ``data:`` URIs).

    Parameters
    ----------
    results : dict
        As returned by :func:`prunekit.report.compare`.
    images : sequence of (file name, caption, png bytes)
    """
    esc = html.escape
    headers, rows, failed = table(results)
    ok = [r for r, bad in zip(rows, failed, strict=True) if not bad]
    best = max((float(r[3]) for r in ok if r[3] != "–"), default=None)
    title = esc(results.get("title", "Pruning methods compared"))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{title}</title><style>{_CSS}</style></head><body>", f"<h1>{title}</h1>"]
    out += [f'<p class="meta">{esc(line)}</p>' for line in _summary(results)]
    out.append('<div class="wide"><table><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in headers)
               + "</tr></thead><tbody>")
    for row, bad in zip(rows, failed, strict=True):
        if bad:
            out.append(f"<tr><td>{esc(row[0])}</td><td class=\"failed\" colspan=\"{len(headers) - 1}\">"
                       f"{esc(row[1])}</td></tr>")
            continue
        cells = []
        for i, c in enumerate(row):
            text = esc(c)
            if i == 3 and best is not None and c != "–" and float(c) == best:
                text = f"<strong>{text}</strong>"
            cells.append(f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    out.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in _notes(results)) + "</ul>")
    if images:
        out.append("<h2>Figures</h2>")
        for _name, caption, png in images:
            data = base64.b64encode(png).decode("ascii")
            out.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    out += ["<h2>Settings</h2>", _kv_table(results.get("settings", {})), "<h2>Machine</h2>",
            _kv_table(results.get("machine", {})), "</body></html>", ""]
    return "\n".join(out)


def _kv_table(values: Mapping[str, Any]) -> str:
    """A two-column HTML table: key, compact JSON value (strings shown bare)."""
    rows = []
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(", ", ": "))
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(text)}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def runtime_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per method and runtime: the pruned model's latency over the original's on that
    runtime per batch size (timed interleaved, outputs verified), and the best runtime."""
    lines = []
    best: tuple[float, str] | None = None
    threads = set()
    for e in results.get("methods", []):
        threads.add((e.get("runtimes") or {}).get("threads"))
        rts = (e.get("runtimes") or {}).get("runtimes") or {}
        for rt, rec in rts.items():
            ratios = rec.get("ratio") or {}
            if not ratios:
                continue
            parts = ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items())
            flag = "" if rec.get("ok") else " (OUTPUTS DIFFER)"
            lines.append(f"  {e['method']:<12} {rt:<12} {parts}{flag}")
            worst = max(ratios.values())
            if best is None or worst < best[0]:
                best = (worst, f"{e['method']} on {rt}")
    if not lines:
        return []
    used = "/".join(str(t) for t in sorted(t for t in threads if t is not None)) or "?"
    head = [f"pruned / original latency on the deployment runtimes ({used} "
            f"thread{'' if used == '1' else 's'}, interleaved):"]
    tail = [f"fastest everywhere it was timed: {best[1]} ({best[0]:.2f}x or less)"] if best else []
    return head + lines + tail


def text_table(results: Mapping[str, Any]) -> list[str]:
    """The table as aligned plain-text lines (for the terminal)."""
    headers, rows, failed = table(results)
    rows = [r if not bad else r[:1] + [r[1]] for r, bad in zip(rows, failed, strict=True)]
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows if i < len(r) and len(r) == len(headers)))
              for i in range(len(headers))]
    def line(cells: Sequence[str]) -> str:
        if len(cells) != len(headers):  # a failed method: its message after the name
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write the figures (PNG), ``report.md`` and ``report.html`` into ``out_dir``, atomically.

    Returns
    -------
    dict
        ``report_md``, ``report_html`` (file names in ``out_dir``) and ``figures`` (PNG names).
    """
    out = Path(out_dir)
    figs = figures(results)
    for name, _caption, png in figs:
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(png)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render_markdown(results, [(n, c) for n, c, _ in figs]), encoding="utf-8")
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(results, figs), encoding="utf-8")
    return {"report_md": "report.md", "report_html": "report.html", "figures": [n for n, _, _ in figs]}
