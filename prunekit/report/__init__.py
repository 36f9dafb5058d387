"""Comparing pruning methods: :func:`compare` runs them under the same budgets and writes
``results.json``, ``report.md`` and a self-contained ``report.html``.

>>> from prunekit.report import compare
>>> results = compare(model, None, ["l1", "csgd", "tp:l1"], target_macs=0.4,
...                   data=(train, test), finetune_epochs=2, out_dir="reports/run1")  # doctest: +SKIP
"""

from __future__ import annotations

from .compare import SCHEMA, check_methods, compare, finetune_epochs_left, fit_budget, machine_info, slug
from .render import render_html, render_markdown, table, text_table, write_report

__all__ = ["SCHEMA", "check_methods", "compare", "finetune_epochs_left", "fit_budget", "machine_info",
           "render_html", "render_markdown", "slug", "table", "text_table", "write_report"]
