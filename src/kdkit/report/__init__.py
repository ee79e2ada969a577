"""Reports: report.md with its plots (markdown.py, plots.py) and the terminal summary (table.py).

Sits above the engine and below the pipeline: it turns metrics and histories into files, and trains nothing.
"""

from __future__ import annotations

from kdkit.report.markdown import write_report
from kdkit.report.table import gain_line, summary_table

__all__ = ["write_report", "summary_table", "gain_line"]
