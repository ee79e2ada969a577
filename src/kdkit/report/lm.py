"""report.md of a language-model run: perplexities, agreement with the teacher, cost, the teacher cache, and
greedy continuations side by side; plots of the training losses, validation curves and perplexities."""

from __future__ import annotations

import math
import pathlib

import matplotlib.pyplot as plt

from kdkit.atomic import write_text
from kdkit.report import plots
from kdkit.report.markdown import _code_block, _table

KEYS = (("teacher", "teacher"), ("baseline_student", "baseline student"), ("student", "distilled student"))


def _num(value, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(v) else format(v, fmt)


def _mean_std(entry: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    mean, std = entry.get(key), (entry.get("std") or {}).get(key)
    if mean is None:
        return "—"
    text = _num(mean * scale, fmt)
    return text + (f" ± {_num(std * scale, fmt)}" if std else "")


def summary_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for key, label in KEYS:
        m = metrics.get(key)
        if not m:
            continue
        rows.append(
            [
                label,
                _mean_std(m, "perplexity", ".2f"),
                _mean_std(m, "nll", ".4f"),
                _mean_std(m, "accuracy", ".2f", 100),
                _mean_std(m, "agreement", ".2f", 100),
                _mean_std(m, "kl", ".4f"),
                f"{m.get('params', 0) / 1e6:.1f} M",
                _num(m.get("tokens_per_s"), ".0f"),
                _num(m.get("speedup"), ".2f") + "×",
            ]
        )
    return rows


HEADERS = [
    "model",
    "perplexity",
    "nll / token",
    "next-token acc. %",
    "top-1 agreement %",
    "KL(teacher‖model)",
    "params",
    "tokens/s",
    "speed-up (tokens/s)",
]


def summary_table(metrics: dict) -> str:
    return _table(HEADERS, summary_rows(metrics))


def gain_line(metrics: dict) -> str:
    """One sentence: the distilled student's perplexity against the baseline's ("" without a baseline)."""
    gain = metrics.get("gain")
    if not gain:
        return ""
    return (
        f"Distillation vs the same student trained on the text alone: perplexity "
        f"{gain['baseline_perplexity']:.2f} → {gain['student_perplexity']:.2f} "
        f"({gain['perplexity_change_pct']:+.1f}%), nll {gain['nll_diff']:+.4f} ± {gain['nll_diff_std']:.4f} "
        f"per token (paired over {gain['seeds']} seed(s))."
    )


def plot_perplexity(metrics: dict, path: pathlib.Path) -> pathlib.Path | None:
    entries = [(label, metrics[key]) for key, label in KEYS if metrics.get(key)]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    try:
        colours = ["tab:purple", "tab:gray", "tab:blue"][-len(entries) :] if len(entries) < 3 else None
        xs = range(len(entries))
        values = [e["perplexity"] for _, e in entries]
        errors = [(e.get("std") or {}).get("perplexity", 0.0) for _, e in entries]
        ax.bar(xs, values, yerr=errors, color=colours or ["tab:purple", "tab:gray", "tab:blue"], capsize=4)
        ax.set_xticks(list(xs), [label for label, _ in entries])
        ax.set_ylabel("test perplexity (lower is better)")
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
        return plots._save(fig, path)
    finally:
        plt.close(fig)


def plot_val_loss(histories: dict[str, list[dict]], path: pathlib.Path) -> pathlib.Path | None:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    try:
        drawn = False
        for phase, records in histories.items():
            xs, ys = plots._series(records, "epoch", "val/loss")
            if xs:
                colour = plots.PHASE_COLOURS.get(plots._phase_kind(phase))
                ax.plot(xs, ys, marker="o", label=phase, color=colour, alpha=0.85)
                drawn = True
        if not drawn:
            return None
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation nll / token")
        ax.legend(fontsize=8)
        return plots._save(fig, path)
    finally:
        plt.close(fig)


def write_lm_report(
    run_dir: pathlib.Path,
    *,
    metrics: dict,
    histories: dict[str, list[dict]],
    formula: str,
    config_yaml: str,
    env: dict,
    samples: list[dict],
) -> pathlib.Path:
    """RUN_DIR/report.md and RUN_DIR/plots/*.png for a causal_lm run.

    metrics: metrics.json (teacher / baseline_student / student entries with perplexity, nll, accuracy, agreement,
    kl, params, tokens_per_s, speedup; optional "gain", "teacher_cache", "data"). samples: [{"prompt", "teacher",
    "baseline_student", "student"}] greedy continuations of held-out prompts.
    """
    run_dir = pathlib.Path(run_dir)
    plot_dir = run_dir / "plots"
    drawn = [
        plot_perplexity(metrics, plot_dir / "perplexity.png"),
        plots.plot_loss_parts(histories, plot_dir / "loss_parts.png"),
        plot_val_loss(histories, plot_dir / "val_loss.png"),
        plots.plot_schedules(histories, plot_dir / "schedules.png"),
    ]
    sections = [f"# kdkit report: {run_dir.name} (language model)", f"**Loss:** `{formula}`"]
    sections.append("## Test text\n\n" + summary_table(metrics))
    if gain_line(metrics):
        sections.append(gain_line(metrics))
    data = metrics.get("data")
    if data:
        sections.append("## Data\n\n" + _table(["", "value"], [[k, str(v)] for k, v in data.items()], numeric=False))
    cache = metrics.get("teacher_cache")
    if cache:
        sections.append(
            "## Teacher cache\n\n" + _table(["", "value"], [[k, str(v)] for k, v in cache.items()], numeric=False)
        )
    if samples:
        lines = ["## Greedy continuations of held-out prompts"]
        for i, s in enumerate(samples, 1):
            lines.append(f"### Prompt {i}\n\n" + _code_block(s["prompt"], "text"))
            for key, label in KEYS:
                if key in s:
                    lines.append(f"**{label}:**\n\n" + _code_block(s[key], "text"))
        sections.append("\n\n".join(lines))
    names = [p.name for p in drawn if p is not None]
    if names:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{n[:-4]}](plots/{n})" for n in names))
    sections.append(
        "## Environment\n\n" + _table(["", "value"], [[str(k), str(v)] for k, v in env.items()], numeric=False)
    )
    sections.append("## Resolved config\n\n" + _code_block(config_yaml, "yaml"))
    return write_text(run_dir / "report.md", "\n\n".join(sections) + "\n")
