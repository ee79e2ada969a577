"""report.md of a language-model run: perplexities and bits per byte, agreement with the teacher, cost, the teacher
cache, and greedy continuations side by side; plots of the training losses, validation curves and perplexities.

Read from metrics.json's schema (docs/metrics.md); the summary table is table.summary_rows with LM_COLUMNS, the one
the terminal prints.
"""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt

from kdkit.atomic import write_text
from kdkit.evaluate.schema import mean_of, std_of
from kdkit.report import plots
from kdkit.report.draft import draft_section
from kdkit.report.markdown import _code_block, _table, speedup_note
from kdkit.report.table import LM_COLUMNS, ROWS, summary_headers
from kdkit.report.table import summary_rows as _summary_rows

KEYS = tuple(ROWS)


def summary_rows(metrics: dict) -> list[list[str]]:
    """The rows of the LM summary (table.summary_rows with LM_COLUMNS); models that were not trained are left out."""
    return [row for row, (key, _) in zip(_summary_rows(metrics, LM_COLUMNS), ROWS) if metrics.get(key)]


HEADERS = summary_headers(LM_COLUMNS)


def summary_table(metrics: dict) -> str:
    return _table(HEADERS, summary_rows(metrics))


def gain_line(metrics: dict) -> str:
    """One sentence: the distilled student's perplexity (and bits per byte, when measured) against the baseline's
    ("" without a baseline).

    The perplexities and bits per byte are each student's mean over seeds; the nll difference is paired seed by
    seed (gain.nll).
    """
    gain = metrics.get("gain")
    if not gain or "nll" not in gain:
        return ""
    student, baseline = mean_of(metrics["student"]["perplexity"]), mean_of(metrics["baseline_student"]["perplexity"])
    change = 100.0 * (student - baseline) / baseline
    bpb = ""
    if "bits_per_byte" in metrics["student"] and "bits_per_byte" in metrics["baseline_student"]:
        bpb = f", bits/byte {mean_of(metrics['baseline_student']['bits_per_byte']):.3f} → "
        bpb += f"{mean_of(metrics['student']['bits_per_byte']):.3f}"
    nll = gain["nll"]
    return (
        f"Distillation vs the same student trained on the text alone: perplexity "
        f"{baseline:.2f} → {student:.2f} ({change:+.1f}%){bpb}, nll {nll['mean']:+.4f} ± {nll['std']:.4f} "
        f"per token (paired over {nll['n']} seed(s))."
    )


def bits_note(metrics: dict) -> str:
    """What bits/byte means, under the table ("" when the run did not measure it)."""
    if "bits_per_byte" not in (metrics.get("teacher") or {}):
        return ""
    return (
        "bits/byte: −log2 p of every predicted test token, summed, ÷ the UTF-8 bytes of the text those tokens "
        "cover (= nll / ln 2 × tokens / bytes). Unlike perplexity, it does not depend on the tokenizer, so it "
        "compares language models that split text differently; bits per character are in metrics.json."
    )


def plot_perplexity(metrics: dict, path: pathlib.Path) -> pathlib.Path | None:
    entries = [(label, metrics[key]) for key, label in KEYS if metrics.get(key)]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    try:
        colours = ["tab:purple", "tab:gray", "tab:blue"][-len(entries) :] if len(entries) < 3 else None
        xs = range(len(entries))
        values = [mean_of(e["perplexity"]) for _, e in entries]
        errors = [std_of(e["perplexity"]) for _, e in entries]
        ax.bar(xs, values, yerr=errors, color=colours or ["tab:purple", "tab:gray", "tab:blue"], capsize=4)
        ax.set_xticks(list(xs), [label for label, _ in entries])
        ax.set_ylabel("test perplexity (lower is better)")
        for x, v in zip(xs, values):
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
        return plots._save(fig, path)
    finally:
        plt.close(fig)


def plot_acceptance(metrics: dict, path: pathlib.Path) -> pathlib.Path | None:
    """Expected tokens per target call against draft tokens k, each draft, sampling at T = 1 (solid) and greedy
    (dashed), with the ideal k + 1 of a draft the target always accepts."""
    curves = metrics.get("acceptance_curve") or {}
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    try:
        colours = {"student": "tab:blue", "baseline_student": "tab:gray"}
        ks = []
        for mode, style in (("temperature_1", "-"), ("greedy", "--")):
            for key, curve in (curves.get(mode) or {}).items():
                ks = [int(k) for k in curve]
                label = f"{dict(KEYS).get(key, key)} ({'T=1' if mode == 'temperature_1' else 'greedy'})"
                ax.plot(ks, list(curve.values()), style, marker="o", color=colours.get(key), label=label)
        ax.plot(ks, [k + 1 for k in ks], ":", color="black", alpha=0.4, label="always accepted (k + 1)")
        ax.set_xlabel("draft tokens per target call (k)")
        ax.set_ylabel("expected tokens per target call")
        ax.legend(fontsize=7)
        return plots._save(fig, path)
    finally:
        plt.close(fig)


def acceptance_section(metrics: dict) -> str | None:
    """The teacher as a speculative-decoding target: expected tokens per target call by k, per draft and mode."""
    curves = metrics.get("acceptance_curve") or {}
    rows = []
    for mode, label in (("temperature_1", "sampling, T = 1"), ("greedy", "greedy")):
        for key, curve in (curves.get(mode) or {}).items():
            rows.append([f"{dict(KEYS).get(key, key)}, {label}", *(f"{v:.3f}" for v in curve.values())])
            ks = list(curve)
    if not rows:
        return None
    return (
        "## The student as a draft for the teacher (speculative decoding)\n\n"
        "Expected tokens per teacher call when the model drafts k tokens, estimated teacher-forced on the test text "
        "(acceptance Σ min(p, q) per position, or argmax agreement for greedy; kdkit.evaluate.acceptance).\n\n"
        + _table(["draft", *(f"k={k}" for k in ks)], rows)
    )


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

    metrics: metrics.json in the schema of docs/metrics.md (model entries with perplexity, nll, accuracy, agreement,
    kl, and bits_per_byte in runs that measured it; cost with tokens_per_s; optional "gain" with nll,
    "teacher_cache", "data"). samples: [{"prompt", "teacher", "baseline_student", "student"}] greedy continuations
    of held-out prompts.
    """
    run_dir = pathlib.Path(run_dir)
    plot_dir = run_dir / "plots"
    drawn = [
        plot_perplexity(metrics, plot_dir / "perplexity.png"),
        plots.plot_loss_parts(histories, plot_dir / "loss_parts.png"),
        plot_val_loss(histories, plot_dir / "val_loss.png"),
        plots.plot_schedules(histories, plot_dir / "schedules.png"),
        plot_acceptance(metrics, plot_dir / "acceptance.png"),
    ]
    sections = [f"# kdkit report: {run_dir.name} (language model)", f"**Loss:** `{formula}`"]
    notes = "\n\n".join(note for note in (bits_note(metrics), speedup_note(metrics)) if note)
    sections.append("## Test text\n\n" + summary_table(metrics) + "\n\n" + notes)
    if gain_line(metrics):
        sections.append(gain_line(metrics))
    data = metrics.get("data")
    if data:
        sections.append("## Data\n\n" + _table(["", "value"], [[k, str(v)] for k, v in data.items()], numeric=False))
    if acceptance_section(metrics):
        sections.append(acceptance_section(metrics))
    if draft_section(metrics):
        sections.append(draft_section(metrics))
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
