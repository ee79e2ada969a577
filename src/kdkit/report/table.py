"""The summary table and the gain line, for the terminal (rich) and, through summary_rows, for report.md.

Both renderings take their rows and cells from summary_rows, so the terminal and the report never disagree.
Number formats: accuracy, F1 and agreement as percentages with 2 decimals (94.35), ECE with 3 decimals, params
with thousands separators (50,890), latency in ms with 3 decimals, speed-up as 12.3×. A missing value (no baseline
trained, agreement NaN) is shown as "—".
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rich.table import Table

MISSING = "—"

# (metrics.json key, row label), in the order the rows are shown.
ROWS: list[tuple[str, str]] = [
    ("teacher", "teacher"),
    ("baseline_student", "baseline student"),
    ("student", "distilled student"),
]


def percent(value: object) -> str:
    return MISSING if _missing(value) else f"{100 * float(value):.2f}"


def three_decimals(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.3f}"


def count(value: object) -> str:
    return MISSING if _missing(value) else f"{round(float(value)):,}"


def megabytes(value: object) -> str:
    # Tiny test models weigh a few kB; two decimals would show them as 0.00.
    if _missing(value):
        return MISSING
    value = float(value)
    return f"{value:,.2f}" if value >= 1 else f"{value:.3g}"


def speedup(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.1f}×"


# (key, header, format, whether students show "mean ± std"). The spread is shown for the quality metrics only:
# params and size do not change across seeds, and latency differs between seeds by measurement noise alone.
COLUMNS: list[tuple[str, str, Callable[[object], str], bool]] = [
    ("accuracy", "accuracy", percent, True),
    ("f1_macro", "macro F1", percent, True),
    ("agreement", "agreement", percent, True),
    ("ece", "ECE", three_decimals, True),
    ("params", "params", count, False),
    ("size_mb", "size MB", megabytes, False),
    ("latency_ms", "latency ms", three_decimals, False),
    ("speedup", "speed-up", speedup, False),
]


def summary_rows(metrics: dict) -> list[list[str]]:
    """[row label, cell, ...] for teacher, baseline student and distilled student, in COLUMNS order.

    A model absent from `metrics` gets a row of "—". A student with n_seeds > 1 shows "mean ± std" in the quality
    columns (the std is formatted like the mean).
    """
    rows = []
    for key, label in ROWS:
        entry = metrics.get(key)
        if not entry:
            rows.append([label] + [MISSING] * len(COLUMNS))
            continue
        spread = entry.get("std", {}) if entry.get("n_seeds", 1) > 1 else {}
        cells = [label]
        for column, _, fmt, with_std in COLUMNS:
            cell = fmt(entry.get(column))
            if with_std and cell != MISSING and not _missing(spread.get(column)):
                cell = f"{cell} ± {fmt(spread[column])}"
            cells.append(cell)
        rows.append(cells)
    return rows


def summary_headers() -> list[str]:
    return ["model"] + [header for _, header, _, _ in COLUMNS]


def summary_table(metrics: dict) -> Table:
    """The summary as a rich Table for the terminal: same rows, columns and numbers as report.md."""
    table = Table(title="kdkit summary")
    for i, header in enumerate(summary_headers()):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in summary_rows(metrics):
        table.add_row(*row)
    return table


def gain_line(metrics: dict) -> str:
    """One line, e.g. "distillation gain: accuracy +0.80 ± 0.31 pts (3 seeds)"; "" if metrics has no gain entry.

    Points are percentage points of accuracy. With one seed there is no spread, so "± std" is left out.
    """
    accuracy = (metrics.get("gain") or {}).get("accuracy")
    if not accuracy:
        return ""
    mean, std, n = gain_numbers(metrics, "accuracy")
    spread = f" ± {100 * std:.2f}" if n > 1 else ""
    return f"distillation gain: accuracy {100 * mean:+.2f}{spread} pts ({n} seed{'s' if n != 1 else ''})"


def gain_numbers(metrics: dict, key: str) -> tuple[float, float, int]:
    """(mean, std, number of seeds) of metrics["gain"][key]; the count falls back to the student's n_seeds."""
    entry = metrics["gain"][key]
    n = entry.get("n", (metrics.get("student") or {}).get("n_seeds", 1))
    return float(entry["mean"]), float(entry.get("std", 0.0)), int(n)


def _missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True
