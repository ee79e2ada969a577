"""The report's figures, one function per PNG.

Each function draws from plain data (histories, reliability curves, metrics.json entries), writes the PNG
atomically and returns its path, or returns None and writes nothing when there is no data to draw (a run whose
teacher was loaded pretrained has no teacher history, say). Every figure is closed before returning: a long
session that writes many reports must not accumulate open figures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

# Agg renders to files with no display; selected before pyplot is imported so that a headless machine (CI, a
# training server) never tries to open a window.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kdkit.atomic import write_with  # noqa: E402
from kdkit.evaluate.schema import mean_of, per_seed_of, std_of  # noqa: E402

DPI = 110
# One colour per kind of phase, so that seeds of the same kind read as one family.
PHASE_COLOURS = {"teacher": "tab:purple", "baseline": "tab:gray", "student": "tab:blue"}
MODEL_LABELS = {"teacher": "teacher", "baseline_student": "baseline student", "student": "distilled student"}
MODEL_COLOURS = {"teacher": "tab:purple", "baseline_student": "tab:gray", "student": "tab:blue"}


def plot_loss_parts(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Training loss parts ("train/<part>", including train/total) over steps, for the distilled-student phases.

    One colour per part. With several seeds each seed is drawn faintly and the mean over seeds at each step is
    drawn on top; with one seed its line is drawn plainly.
    """
    phases = [records for name, records in sorted(histories.items()) if _phase_kind(name) == "student"]
    parts = sorted({key for records in phases for r in records for key in r if key.startswith("train/")})
    # part → one (steps, values) series per seed that logged it
    series = {part: [xy for xy in (_series(records, "step", part) for records in phases) if xy[0]] for part in parts}
    series = {part: per_seed for part, per_seed in series.items() if per_seed}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for i, (part, per_seed) in enumerate(series.items()):
            colour = f"C{i % 10}"
            by_step: dict[int, list[float]] = {}
            for steps, values in per_seed:
                for step, value in zip(steps, values, strict=True):
                    by_step.setdefault(step, []).append(value)
                if len(per_seed) > 1:
                    ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            steps = sorted(by_step)
            mean = [float(np.mean(by_step[s])) for s in steps]
            ax.plot(steps, mean, color=colour, linewidth=1.6, label=part.removeprefix("train/"))
        seeds = f" (mean of {len(phases)} seeds)" if len(phases) > 1 else ""
        ax.set(
            xlabel="step", ylabel="loss (part before weighting)", title=f"Training loss parts, distilled student{seeds}"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_schedules(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Scheduled values ("sched/<loss>.<what>": loss weights, the KD temperature) and the LR over steps, from the
    first distilled-student phase (every seed follows the same schedules). None when nothing is scheduled."""
    phases = [records for name, records in sorted(histories.items()) if _phase_kind(name) == "student"]
    if not phases:
        return None
    keys = sorted({key for r in phases[0] for key in r if key.startswith("sched/")})
    if not keys:
        return None
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    try:
        for i, key in enumerate(keys):
            steps, values = _series(phases[0], "step", key)
            ax.plot(steps, values, color=f"C{i % 10}", label=key.removeprefix("sched/"))
        ax.set(xlabel="step", ylabel="value", title="Scheduled loss weights and parameters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        steps, values = _series(phases[0], "step", "lr")
        ax_lr.plot(steps, values, color="tab:gray")
        ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        ax_lr.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_val_accuracy(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Validation accuracy (%) per epoch, one line per phase that logged "val/accuracy"."""
    series = {name: _series(records, "epoch", "val/accuracy") for name, records in sorted(histories.items())}
    series = {name: xy for name, xy in series.items() if xy[0]}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for name, (epochs, accuracy) in series.items():
            colour = PHASE_COLOURS.get(_phase_kind(name), "tab:green")
            ax.plot(epochs, [100 * a for a in accuracy], marker="o", markersize=3, color=colour, alpha=0.8, label=name)
        ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2 if len(series) > 6 else 1)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_reliability(curves: dict[str, dict], path: Path) -> Path | None:
    """Reliability diagram: accuracy against confidence per bin, one curve per model, and the diagonal."""
    curves = {model: curve for model, curve in curves.items() if curve and curve.get("confidence")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label="perfectly calibrated")
        for model, curve in curves.items():
            ax.plot(
                curve["confidence"],
                curve["accuracy"],
                marker="o",
                markersize=4,
                color=MODEL_COLOURS.get(model),
                label=MODEL_LABELS.get(model, model),
            )
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy")
        ax.set_title("Reliability (below the diagonal: over-confident)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> Path:
    """The confusion matrix (rows true, columns predicted), coloured by row fraction, with counts in the cells.

    Colour by fraction of the true class, so rare classes are as readable as common ones; the counts are written in
    the cells while they fit (up to 12 classes).
    """
    matrix = np.asarray(matrix)
    num_classes = matrix.shape[0]
    names = list(class_names) if len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    row_fraction = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * num_classes, 12)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    try:
        image = ax.imshow(row_fraction, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
        ax.set_xticks(range(num_classes), names, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(num_classes), names, fontsize="small")
        ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix, distilled student")
        if num_classes <= 12:
            for t in range(num_classes):
                for p in range(num_classes):
                    colour = "white" if row_fraction[t, p] > 0.5 else "black"
                    ax.text(p, t, str(int(matrix[t, p])), ha="center", va="center", fontsize="x-small", color=colour)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_comparison(metrics: dict, path: Path) -> Path | None:
    """Bars of accuracy and macro F1 (%) for teacher, baseline student and distilled student.

    metrics: metrics.json (docs/metrics.md). Models with more than one seed carry their std as error bars.
    """
    models = [m for m in ("teacher", "baseline_student", "student") if metrics.get(m)]
    if not models:
        return None
    keys = [("accuracy", "accuracy"), ("f1_macro", "macro F1")]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        x = np.arange(len(keys))
        for i, model in enumerate(models):
            entry = metrics[model]
            heights = [100 * _number(mean_of(entry.get(key))) for key, _ in keys]
            errors = None
            if any(len(per_seed_of(entry.get(key))) > 1 for key, _ in keys):
                errors = [100 * _number(std_of(entry.get(key)), default=0.0) for key, _ in keys]
            offset = (i - (len(models) - 1) / 2) * width
            bars = ax.bar(
                x + offset,
                heights,
                width,
                yerr=errors,
                capsize=4,
                color=MODEL_COLOURS[model],
                label=MODEL_LABELS[model],
            )
            ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=2)
        # Zoom in on the range the bars occupy: distillation gains are often a point or less, invisible from 0.
        finite = [100 * _number(mean_of(metrics[m].get(k))) for m in models for k, _ in keys]
        finite = [h for h in finite if np.isfinite(h)]
        low = max(0.0, min(finite) - 10) if finite else 0.0
        ax.set_ylim(low, 101)
        ax.set_xticks(x, [label for _, label in keys])
        ax.set(ylabel="%", title="Teacher, baseline and distilled student")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
        return _save(fig, path)
    finally:
        plt.close(fig)


# The unit of each corruption's strength, for the x axis of the robustness plot.
CORRUPTION_AXES = {
    "gaussian_noise": "noise std (normalised units)",
    "occlusion": "occluded fraction of the area",
    "blur": "blur sigma (pixels)",
    "token_dropout": "fraction of tokens dropped",
}


def plot_robustness(robustness: dict, path: Path) -> Path | None:
    """Accuracy (%) against corruption strength: one panel per corruption, one line per model.

    robustness: the output of evaluate.robustness ({"clean": {model: entry}, kind: {strength: {model: entry}}}).
    Each line starts at strength 0 with the clean accuracy. Models evaluated with several seeds carry their std over
    seeds as error bars. None when there is no corruption to draw.
    """
    clean = robustness.get("clean") or {}
    kinds = [kind for kind, by_strength in robustness.items() if kind != "clean" and by_strength]
    models = [m for m in MODEL_COLOURS if m in clean] + [m for m in clean if m not in MODEL_COLOURS]
    if not kinds or not models:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), sharey=True, squeeze=False)
    try:
        for ax, kind in zip(axes[0], kinds):
            by_strength = sorted(robustness[kind].items(), key=lambda item: float(item[0]))
            for model in models:
                points = [(0.0, clean[model])]
                points += [(float(s), entries[model]) for s, entries in by_strength if model in entries]
                xs = [x for x, _ in points]
                ys = [100 * _number(entry.get("mean")) for _, entry in points]
                several = len(clean[model].get("per_seed") or []) > 1
                errors = [100 * _number(entry.get("std"), default=0.0) for _, entry in points] if several else None
                ax.errorbar(
                    xs,
                    ys,
                    yerr=errors,
                    marker="o",
                    markersize=3,
                    capsize=3,
                    color=MODEL_COLOURS.get(model, "tab:green"),
                    label=MODEL_LABELS.get(model, model),
                )
            ax.set(xlabel=CORRUPTION_AXES.get(kind, "strength"), title=kind.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][0].legend(fontsize="small")
        fig.suptitle("Accuracy under input corruptions (strength 0: clean)")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def frontier_plot(summary: dict, cost: str, cost_label: str, path: Path) -> Path | None:
    """A sweep's quality against one cost (log scale): distilled and labels-only students with their seed spread,
    each group's frontier as a line, the teacher as a dashed line. None when no point has both figures."""
    key = summary["metric"]
    scale = 100.0 if key in ("accuracy", "f1_macro", "agreement") else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for group, label, colour in (("student", "distilled", "tab:blue"), ("baseline", "labels only", "tab:grey")):
        rows = [r for r in summary["rows"] if r.get(group) is not None and r.get(cost) is not None]
        if not rows:
            continue
        drawn = True
        x = [float(r[cost]) for r in rows]
        y = [scale * r[group] for r in rows]
        err = [scale * (r.get(f"{group}_std") or 0.0) for r in rows]
        ax.errorbar(x, y, yerr=err, fmt="o", color=colour, label=label, capsize=3)
        front = sorted((r for r in rows if r["name"] in summary["frontier"][cost][group]), key=lambda r: r[cost])
        ax.plot([float(r[cost]) for r in front], [scale * r[group] for r in front], "-", color=colour, alpha=0.6)
        if group == "student":
            for r in rows:
                ax.annotate(r["name"], (float(r[cost]), scale * r[group]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
    if not drawn:
        plt.close(fig)
        return None
    if summary.get("teacher") is not None:
        ax.axhline(scale * summary["teacher"], color="tab:red", linestyle="--", label="teacher")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the decades only: minor labels collide
    ax.set_xlabel(cost_label)
    ax.set_ylabel(f"{key}{' %' if scale == 100.0 else ''} (test)" + (", lower is better" if summary.get(
        "lower_is_better") else ""))
    ax.set_title(f"Sweep: {key} against {cost_label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _save(fig: plt.Figure, path: Path) -> Path:
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list[float]]:
    """(xs, ys) of the records that carry both keys with a finite y, in record order."""
    xs, ys = [], []
    for record in records:
        if x_key in record and y_key in record and np.isfinite(_number(record[y_key])):
            xs.append(record[x_key])
            ys.append(float(record[y_key]))
    return xs, ys


def _phase_kind(name: str) -> str:
    """The kind of a phase from its name: "student-s0" → "student", "baseline-s2" → "baseline"."""
    return name.split("-", 1)[0]


def _number(value: object, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
