"""Reports: report.md with its plots (markdown.py, plots.py; lm.py for language models) and the terminal summary
(table.py), all read from metrics.json's schema (docs/metrics.md).

Sits above the engine and below the pipeline: it turns metrics and histories into files, and trains nothing.
"""

from __future__ import annotations

from kdkit.report.lm import write_lm_report
from kdkit.report.markdown import write_report
from kdkit.report.table import (
    CLASSIFICATION_COLUMNS,
    COST_COLUMNS,
    LM_COLUMNS,
    TABULAR_COLUMNS,
    gain_line,
    summary_table,
)

__all__ = [
    "write_report",
    "write_lm_report",
    "summary_table",
    "gain_line",
    "CLASSIFICATION_COLUMNS",
    "LM_COLUMNS",
    "TABULAR_COLUMNS",
    "COST_COLUMNS",
]
