"""Reports: report.md with its plots (markdown.py, plots.py; lm.py for language models) and the terminal summary
(table.py), all read from metrics.json's schema (docs/metrics.md).

Sits above the engine and below the pipeline: it turns metrics and histories into files, and trains nothing.
Names load on first use, so that reading a task's summary columns (table.py) does not import matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "write_report": "kdkit.report.markdown",
    "write_lm_report": "kdkit.report.lm",
    "summary_table": "kdkit.report.table",
    "gain_line": "kdkit.report.table",
    "CLASSIFICATION_COLUMNS": "kdkit.report.table",
    "LM_COLUMNS": "kdkit.report.table",
    "TABULAR_COLUMNS": "kdkit.report.table",
    "COST_COLUMNS": "kdkit.report.table",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdkit.report' has no attribute {name!r}")
