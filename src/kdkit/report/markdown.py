"""report.md: what was trained, how well it did, what it costs, and how it was made.

The summary table shares its rows and number formats with the terminal table (table.summary_rows), so the two
never disagree. Everything is read from metrics.json's schema (docs/metrics.md) through evaluate.schema's accessors.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from kdkit.atomic import write_text
from kdkit.evaluate.schema import cost_of, n_seeds, per_seed_of
from kdkit.report import plots
from kdkit.report.table import (
    MISSING,
    ROWS,
    Column,
    gain_interval,
    gain_numbers,
    percent,
    summary_headers,
    summary_rows,
    three_decimals,
)

# A confusion matrix of more classes than this is unreadable as an image.
MAX_CONFUSION_CLASSES = 20

PLOT_FILES = [
    "comparison.png",
    "loss_parts.png",
    "schedules.png",
    "val_accuracy.png",
    "reliability.png",
    "confusion.png",
    "robustness.png",
]


def write_report(
    run_dir: pathlib.Path,
    *,
    metrics: dict,
    histories: dict[str, list[dict]],
    formula: str,
    config_yaml: str,
    class_names: list[str],
    confusion_matrix: np.ndarray | None,
    reliability_curves: dict[str, dict],
    env: dict,
    robustness: dict | None = None,
    columns: list[Column] | None = None,
) -> pathlib.Path:
    """Write RUN_DIR/report.md and its PNGs under RUN_DIR/plots/; return the path of report.md.

    metrics: the content of metrics.json in the schema of docs/metrics.md (evaluate.schema.assemble).
    histories: phase name ("student-s0", "baseline-s0", "teacher-0") → records in time order.
    formula: the loss as printed at the start of the run, e.g. "total = 0.1*ce + 0.9*soft_kl(T=4)".
    confusion_matrix: the distilled student's (C, C) matrix; plotted only when given and C ≤ 20.
    reliability_curves: model key ("teacher", "student", "baseline_student") → output of evaluate.reliability.
    env: versions, seed, device, ... shown as a two-column table.
    robustness: the output of evaluate.robustness, or None when it was not measured (no plot, no section).
    columns: the summary table's columns (None: table.CLASSIFICATION_COLUMNS).

    Plots without data (no history for a phase, no curves) are not drawn and not linked. A plot from an earlier
    report in the same run directory that this report does not draw is removed, so plots/ matches report.md.
    """
    run_dir = pathlib.Path(run_dir)
    plot_dir = run_dir / "plots"
    drawn = [
        plots.plot_comparison(metrics, plot_dir / "comparison.png"),
        plots.plot_loss_parts(histories, plot_dir / "loss_parts.png"),
        plots.plot_schedules(histories, plot_dir / "schedules.png"),
        plots.plot_val_accuracy(histories, plot_dir / "val_accuracy.png"),
        plots.plot_reliability(reliability_curves, plot_dir / "reliability.png"),
    ]
    if confusion_matrix is not None and np.asarray(confusion_matrix).shape[0] <= MAX_CONFUSION_CLASSES:
        drawn.append(plots.plot_confusion(confusion_matrix, class_names, plot_dir / "confusion.png"))
    if robustness:
        drawn.append(plots.plot_robustness(robustness, plot_dir / "robustness.png"))
    drawn_names = {path.name for path in drawn if path is not None}
    for name in PLOT_FILES:
        if name not in drawn_names:
            (plot_dir / name).unlink(missing_ok=True)

    sections = [
        f"# kdkit report: {run_dir.name}",
        f"**Loss:** `{formula}`",
        _summary_section(metrics, columns),
        _per_seed_section(metrics),
        _robustness_section(robustness),
        _plots_section(drawn_names, class_names, confusion_matrix),
        "## Environment\n\n" + _table(["", "value"], [[str(k), str(v)] for k, v in env.items()], numeric=False),
        "## Resolved config\n\n" + _code_block(config_yaml, "yaml"),
    ]
    text = "\n\n".join(section for section in sections if section) + "\n"
    return write_text(run_dir / "report.md", text)


def _summary_section(metrics: dict, columns: list[Column] | None) -> str:
    lines = ["## Summary", "", _table(summary_headers(columns), summary_rows(metrics, columns))]
    lines += ["", "Accuracy, macro F1 and agreement (top-1 agreement with the teacher) in %; ECE: expected calibration"]
    lines += ["error (lower is better); " + speedup_note(metrics)]
    if n_seeds(metrics) > 1:
        lines += [f"Students: mean ± std (population) over {n_seeds(metrics)} seeds."]
    members = cost_of(metrics, "teacher", "members") or 1
    if members > 1:
        lines += [f"The teacher is an ensemble of {members:.0f} members."]
    cache = metrics.get("teacher_cache")
    if cache:
        views = f", {cache['views']} augmented views per example" if cache.get("views") else ""
        lines += [
            f"Teacher outputs were cached once on disk: {cache['bytes'] / 1e6:.2f} MB for {cache['examples']} "
            f"examples ({cache['bytes_per_example']} bytes each{views})."
        ]
    if metrics.get("gain"):
        lines += ["", "### Distillation gain", "", *_gain_lines(metrics)]
    elif not metrics.get("baseline_student"):
        lines += ["", "No baseline student was trained, so the gain of distillation is not measured."]
    return "\n".join(lines)


def speedup_note(metrics: dict) -> str:
    """What the two speed-ups mean, with the batch size of the throughput when the run recorded it."""
    batch = cost_of(metrics, "teacher", "batch_size")
    at = f"at batch {batch:.0f}" if batch else "at the evaluation batch size"
    return (
        "speed-up (latency): teacher latency ÷ this model's latency (batch 1); speed-up (throughput): this model's "
        f"throughput ÷ the teacher's, {at}. Every model is timed the same way."
    )


def _gain_lines(metrics: dict) -> list[str]:
    """One line per key of metrics["gain"], e.g. "Distillation gain (accuracy): +0.80 ± 0.31 points over 3 seeds,
    95% CI [+0.03, +1.57]".

    Differences are paired by seed (distilled − baseline with the same seed). Accuracy and F1 are in percentage
    points; ECE is absolute, and negative is better. With one seed there is no spread and no interval to show; an
    interval that contains 0 says so.
    """
    lines = []
    for key in metrics["gain"]:
        mean, std, n = gain_numbers(metrics, key)
        if key == "ece":
            name, scale, digits, unit = "ECE, lower is better", 1, 3, ""
        else:
            name, scale, digits, unit = _LABELS.get(key, key), 100, 2, " points"
        value = f"{scale * mean:+.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")
        line = f"- Distillation gain ({name}): {value}{unit} over {n} seed{'s' if n != 1 else ''}"
        interval = gain_interval(metrics, key)
        if interval is not None:
            low, high = interval
            line += f", 95% CI [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
            if low <= 0.0 <= high:
                line += " (contains 0: not distinguishable from no gain)"
        lines.append(line)
    return lines


_LABELS = {"accuracy": "accuracy", "f1_macro": "macro F1", "agreement": "agreement"}


def _per_seed_section(metrics: dict) -> str:
    """One row per seed: the distilled student's and, when trained, the baseline's scores and the paired difference."""
    student_seeds = _by_seed(metrics, "student")
    if not student_seeds:
        return ""
    baseline_seeds = _by_seed(metrics, "baseline_student")
    headers = ["seed", "student accuracy", "student macro F1", "student ECE", "student agreement"]
    if baseline_seeds:
        headers += ["baseline accuracy", "baseline macro F1", "baseline ECE", "Δ accuracy (pts)"]
    seeds = metrics.get("seeds") or list(range(len(student_seeds)))
    rows = []
    for i, student in enumerate(student_seeds):
        row = [str(seeds[i] if i < len(seeds) else i)]
        row += [percent(student.get("accuracy")), percent(student.get("f1_macro")), three_decimals(student.get("ece"))]
        row += [percent(student.get("agreement"))]
        if baseline_seeds:
            baseline = baseline_seeds[i] if i < len(baseline_seeds) else {}
            row += [percent(baseline.get("accuracy")), percent(baseline.get("f1_macro"))]
            row += [three_decimals(baseline.get("ece")), _difference(student, baseline, "accuracy")]
        rows.append(row)
    return "## Per seed\n\n" + _table(headers, rows)


def _by_seed(metrics: dict, model: str) -> list[dict]:
    """[{metric: value of seed i}, ...] in seeds order, from a model entry of either form; [] without the model."""
    entry = metrics.get(model) or {}
    columns = {key: per_seed_of(value) for key, value in entry.items()}
    length = max((len(v) for v in columns.values()), default=0)
    return [{key: v[i] for key, v in columns.items() if i < len(v)} for i in range(length)]


_STRENGTH_UNITS = {
    "gaussian_noise": "noise std in units of the normalised data",
    "occlusion": "fraction of the image area zeroed (set to the mean) in one box",
    "blur": "Gaussian blur sigma in pixels",
    "token_dropout": "fraction of non-padding tokens replaced by the mask token",
}


def _robustness_section(robustness: dict | None) -> str:
    """Accuracy (%) per corruption and strength, one column per model; students over seeds as mean ± std."""
    clean = (robustness or {}).get("clean") or {}
    models = [(key, label) for key, label in ROWS if key in clean]  # a model that was not evaluated gets no column
    if not models:
        return ""
    kinds = [kind for kind in robustness if kind != "clean" and robustness[kind]]
    rows = [["clean", "0"] + [_accuracy_cell(clean[key]) for key, _ in models]]
    for kind in kinds:
        for strength, entries in sorted(robustness[kind].items(), key=lambda item: float(item[0])):
            cells = [_accuracy_cell(entries.get(key)) for key, _ in models]
            rows.append([kind.replace("_", " "), f"{float(strength):g}", *cells])
    headers = ["corruption", "strength"] + [label for _, label in models]
    lines = ["## Robustness", "", _table(headers, rows), ""]
    lines += ["Accuracy in % on the evaluation set with corrupted inputs; every model saw the same corrupted inputs."]
    if any(len(clean[key].get("per_seed") or []) > 1 for key, _ in models):
        lines += ["Models with several seeds: mean ± std (population) over seeds."]
    lines += [f"Strength of {kind.replace('_', ' ')}: {_STRENGTH_UNITS.get(kind, 'as configured')}." for kind in kinds]
    drops = [_mean_drop(robustness, kinds, key, label) for key, label in models]
    if kinds and all(drops):
        lines += ["", "Mean accuracy drop from clean over all corruptions and strengths (lower: more robust):"]
        lines += ["; ".join(drops) + "."]
    return "\n".join(lines)


def _accuracy_cell(entry: dict | None) -> str:
    if not entry:
        return MISSING
    cell = percent(entry.get("mean"))
    if len(entry.get("per_seed") or []) > 1 and cell != MISSING:
        cell += f" ± {percent(entry.get('std'))}"
    return cell


def _mean_drop(robustness: dict, kinds: list[str], key: str, label: str) -> str:
    """'<label> 12.34 points': the drop averaged over every (corruption, strength), or "" when one is missing."""
    drops = [entries[key].get("drop") for kind in kinds for entries in robustness[kind].values() if key in entries]
    if not drops or any(not isinstance(d, (int, float)) or math.isnan(d) for d in drops):
        return ""
    return f"{label} {100 * float(np.mean(drops)):.2f} points"


def _plots_section(drawn: set[str], class_names: list[str], confusion_matrix: np.ndarray | None) -> str:
    captions = {
        "comparison.png": "Accuracy and macro F1; error bars are the std over seeds.",
        "loss_parts.png": "Loss parts of the distilled student, each before its weight; total is the weighted sum.",
        "schedules.png": "Scheduled loss weights and parameters (e.g. the KD temperature), and the learning rate.",
        "val_accuracy.png": "Validation accuracy per epoch for every trained phase.",
        "reliability.png": "Reliability diagram: points below the diagonal are over-confident.",
        "confusion.png": "Confusion matrix of the distilled student (rows true, columns predicted).",
        "robustness.png": "Accuracy under input corruptions by strength (0: clean); error bars: std over seeds.",
    }
    parts = ["## Plots"]
    for name in PLOT_FILES:
        if name in drawn:
            parts.append(f"![{name.removesuffix('.png')}](plots/{name})\n\n{captions[name]}")
    if confusion_matrix is not None and "confusion.png" not in drawn:
        num_classes = np.asarray(confusion_matrix).shape[0]
        parts.append(
            f"The confusion matrix ({num_classes} classes) is not drawn above {MAX_CONFUSION_CLASSES} classes."
        )
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _difference(student: dict, baseline: dict, key: str) -> str:
    try:
        value = 100 * (float(student[key]) - float(baseline[key]))
    except (KeyError, TypeError, ValueError):
        return MISSING
    return MISSING if math.isnan(value) else f"{value:+.2f}"


def _table(headers: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the others right-aligned if numeric."""
    align = [":--"] + ["--:" if numeric else ":--"] * (len(headers) - 1)
    lines = [_row(headers), _row(align)] + [_row(row) for row in rows]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    # A "|" inside a cell would end it early.
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _code_block(text: str, language: str) -> str:
    # The fence must be longer than any run of backticks in the text, or the text would close it.
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"
