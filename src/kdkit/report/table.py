"""The summary table and the gain line of every task, for the terminal (rich) and, through summary_rows, for
report.md and the model card, read from metrics.json's schema (docs/metrics.md) through its accessors.

A task declares its columns: a list of (key, header, format). A key names a metric of the model entries
(metrics["student"]["accuracy"]); a key "cost.<field>" names a field of metrics["cost"][model], measured the same
way for every model and task. Quality cells of a model with several seeds read "mean ± std" (population).

Number formats: accuracy, F1 and agreement as percentages with 2 decimals (94.35), ECE, bits per byte and latency
(ms) with 3 decimals, params with thousands separators (50,890), rates (examples/s, tokens/s) as whole numbers,
speed-up as 12.3×. A missing value (no baseline trained, agreement NaN, a cost not measured) is shown as "—".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from rich.table import Table

from kdkit.evaluate.schema import cost_of, mean_of, n_seeds, per_seed_of, std_of

MISSING = "—"

# (metrics.json key, row label), in the order the rows are shown.
ROWS: list[tuple[str, str]] = [
    ("teacher", "teacher"),
    ("baseline_student", "baseline student"),
    ("student", "distilled student"),
]

Column = tuple[str, str, Callable[[object], str]]  # (key or "cost.<field>", header, format)
COST_PREFIX = "cost."


def percent(value: object) -> str:
    return MISSING if _missing(value) else f"{100 * float(value):.2f}"


def two_decimals(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.2f}"


def three_decimals(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.3f}"


def four_decimals(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.4f}"


def count(value: object) -> str:
    return MISSING if _missing(value) else f"{round(float(value)):,}"


def rate(value: object) -> str:
    """Per-second rates: whole numbers with separators; below 100, three significant digits (a slow teacher)."""
    if _missing(value):
        return MISSING
    value = float(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def megabytes(value: object) -> str:
    # Tiny test models weigh a few kB; two decimals would show them as 0.00.
    if _missing(value):
        return MISSING
    value = float(value)
    return f"{value:,.2f}" if value >= 1 else f"{value:.3g}"


def speedup(value: object) -> str:
    return MISSING if _missing(value) else f"{float(value):.1f}×"


# The cost of every task, from metrics["cost"]: the same measurement for every model (evaluate.cost).
COST_COLUMNS: list[Column] = [
    ("cost.params", "params", count),
    ("cost.size_mb", "size MB", megabytes),
    ("cost.latency_ms", "latency ms", three_decimals),
    ("cost.throughput", "examples/s", rate),
    ("cost.speedup_latency", "speed-up (latency)", speedup),
    ("cost.speedup_throughput", "speed-up (throughput)", speedup),
]

CLASSIFICATION_COLUMNS: list[Column] = [
    ("accuracy", "accuracy", percent),
    ("f1_macro", "macro F1", percent),
    ("agreement", "agreement", percent),
    ("ece", "ECE", three_decimals),
    *COST_COLUMNS,
]

# A language model's throughput reads in tokens/s (an example is a block of tokens); its ratio is the same.
# Bits per byte sit beside perplexity: the same likelihood per byte of text, comparable across tokenizers (bits per
# character stay in metrics.json, to keep the table narrow).
LM_COLUMNS: list[Column] = [
    ("perplexity", "perplexity", two_decimals),
    ("bits_per_byte", "bits/byte", three_decimals),
    ("nll", "nll / token", four_decimals),
    ("accuracy", "next-token acc. %", percent),
    ("agreement", "top-1 agreement %", percent),
    ("kl", "KL(teacher‖model)", four_decimals),
    ("acceptance", "acceptance %", percent),
    *[("cost.tokens_per_s", "tokens/s", rate) if c[0] == "cost.throughput" else c for c in COST_COLUMNS],
]

# For a tabular task whose model entries carry these metrics (fidelity: top-1 agreement with the teacher).
TABULAR_COLUMNS: list[Column] = [
    ("accuracy", "accuracy", percent),
    ("f1_macro", "macro F1", percent),
    ("fidelity_test", "fidelity test", percent),
    ("fidelity_neighbourhood", "fidelity neighbourhood", percent),
    *COST_COLUMNS,
]


def summary_headers(columns: Sequence[Column] | None = None) -> list[str]:
    return ["model"] + [header for _, header, _ in _columns(columns)]


def summary_rows(metrics: dict, columns: Sequence[Column] | None = None) -> list[list[str]]:
    """[row label, cell, ...] for teacher, baseline student and distilled student, one cell per column.

    columns: the task's columns (None: CLASSIFICATION_COLUMNS). A model absent from `metrics` gets a row of "—".
    A metric over several seeds shows "mean ± std" (the std formatted like the mean); cost cells show the one
    measurement.
    """
    columns = _columns(columns)
    rows = []
    for model, label in ROWS:
        entry = metrics.get(model)
        if not entry:
            rows.append([label] + [MISSING] * len(columns))
            continue
        cells = [label]
        for key, _, fmt in columns:
            if key.startswith(COST_PREFIX):
                cells.append(fmt(cost_of(metrics, model, key.removeprefix(COST_PREFIX))))
                continue
            value = entry.get(key)
            cell = fmt(mean_of(value))
            if len(per_seed_of(value)) > 1 and cell != MISSING and not _missing(std_of(value)):
                cell = f"{cell} ± {fmt(std_of(value))}"
            cells.append(cell)
        rows.append(cells)
    return rows


def summary_table(metrics: dict, columns: Sequence[Column] | None = None) -> Table:
    """The summary as a rich Table for the terminal: same rows, columns and numbers as report.md."""
    table = Table(title="kdkit summary")
    for i, header in enumerate(summary_headers(columns)):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in summary_rows(metrics, columns):
        table.add_row(*row)
    return table


def gain_line(metrics: dict, columns: Sequence[Column] | None = None) -> str:
    """One line on the first column that has a paired gain, e.g. "distillation gain: accuracy +0.80 ± 0.31 pts,
    95% CI [+0.03, +1.57] (3 seeds)"; "" if metrics has no gain entry.

    The difference is formatted like the column (percent columns in percentage points, "pts"). With one seed there
    is no spread and no interval, so both are left out; an interval that contains 0 adds "not distinguishable from
    no gain", whatever the mean's sign.
    """
    gain = metrics.get("gain") or {}
    column = next((c for c in _columns(columns) if not c[0].startswith(COST_PREFIX) and c[0] in gain), None)
    if column is None:
        return ""
    key, header, fmt = column
    mean, std, n = gain_numbers(metrics, key)
    spread = f" ± {fmt(std)}" if n > 1 else ""
    unit = " pts" if fmt is percent else ""
    interval = gain_interval(metrics, key)
    ci = ""
    if interval is not None:
        low, high = interval
        ci = f", 95% CI [{_signed(low, fmt)}, {_signed(high, fmt)}]"
        if low <= 0.0 <= high:
            ci += ", not distinguishable from no gain"
    return f"distillation gain: {header} {_signed(mean, fmt)}{spread}{unit}{ci} ({n} seed{'s' if n != 1 else ''})"


def _signed(value: float, fmt) -> str:
    """fmt(|value|) with its sign: "+0.80", "-4.00"; the missing mark stays unsigned."""
    magnitude = fmt(abs(value))
    return magnitude if magnitude == MISSING else ("-" if value < 0 else "+") + magnitude


def gain_interval(metrics: dict, key: str) -> tuple[float, float] | None:
    """(low, high) of metrics["gain"][key]["ci95"]; None with one seed or in a run written before the interval."""
    interval = metrics["gain"][key].get("ci95")
    return None if interval is None else (float(interval[0]), float(interval[1]))


def gain_numbers(metrics: dict, key: str) -> tuple[float, float, int]:
    """(mean, std, number of seeds) of metrics["gain"][key]; the count falls back to the run's seeds."""
    entry = metrics["gain"][key]
    n = entry.get("n", n_seeds(metrics))
    return float(entry["mean"]), float(entry.get("std", 0.0)), int(n)


def _columns(columns: Sequence[Column] | None) -> list[Column]:
    return list(CLASSIFICATION_COLUMNS if columns is None else columns)


def _missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True
