"""The tabular task's report: report.md and its PNGs, read from metrics.json's schema (docs/metrics.md) through
kdkit.evaluate.schema's accessors.

The summary table takes its cells from kdkit.report.table.summary_rows with the task's columns, the same cells as
the terminal table (`kdkit interpret`, `kdkit train`), so the two never disagree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdkit.atomic import write_text
from kdkit.evaluate.schema import mean_of, n_seeds, per_seed_of, std_of
from kdkit.interpret.auto import describe
from kdkit.interpret.students import coefficients_text, tree_rules
from kdkit.report.markdown import speedup_note
from kdkit.report.plots import _save, plt
from kdkit.report.table import MISSING, TABULAR_COLUMNS, gain_interval, gain_line, summary_headers, summary_rows

MAX_RULES_IN_REPORT = 40


def _pm(value, percent: bool = True) -> str:
    """A model entry's value as "mean ± std" (percent: × 100, 2 decimals); "—" when missing or NaN."""
    mean = mean_of(value)
    if mean is None or not math.isfinite(mean):
        return MISSING
    scale = 100 if percent else 1
    text = f"{scale * mean:.2f}"
    return text + (f" ± {scale * std_of(value):.2f}" if len(per_seed_of(value)) > 1 else "")


def size_text(entry: dict, kind: str) -> str:
    """Mean size over seeds (sizes hardly vary, so no spread): rules / leaves / depth, or non-zero coefficients."""
    if kind == "decision_tree":
        depth = max(per_seed_of(entry["depth"]))
        return f"{mean_of(entry['rules']):.1f} rules / {mean_of(entry['leaves']):.1f} leaves / depth {depth:.0f}"
    return f"{mean_of(entry['nonzero']):.1f} of {mean_of(entry['features']):.0f} features"


def fidelity_line(metrics: dict) -> str:
    """The distilled student's fidelity and the labels-only model's, for the report and the log."""
    s, b = metrics["student"], metrics.get("baseline_student") or {}
    line = f"fidelity on test {_pm(s['fidelity_test'])} %, around the test rows {_pm(s['fidelity_neighbourhood'])} %"
    if b:
        line += f" (labels only: {_pm(b['fidelity_test'])} %, {_pm(b['fidelity_neighbourhood'])} %)"
    return line


# ---------------------------------------------------------------------------------------------------------------
# report.md


def write_interpret_report(run_dir: Path, *, cfg, metrics: dict, kept, x_train: np.ndarray, env: dict) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; return the path of report.md.

    kept: the kept seed's FittedStudent (kdkit.interpret.predict); x_train: its seed's encoded training rows (the
    rules count them). tree.png needs the fitted scikit-learn tree: a student read back from JSON (phases reused by
    --resume) keeps the tree.png drawn when it was fit, if there is one.
    """
    drawn = _draw_plots(run_dir / "plots", cfg, metrics, kept)
    tree_drawn = any(p is not None and p.name == "tree.png" for p in drawn)
    lines = [f"# kdkit tabular: {cfg.run.name}", ""]
    lines += _summary_section(cfg, metrics)
    lines += auto_section(metrics) if metrics.get("student_auto") else []
    lines += _per_class_section(metrics)
    lines += _student_section(cfg, metrics, kept, x_train, tree_drawn)
    lines += _data_section(cfg, kept.encoder)
    lines += [f"![{p.stem}](plots/{p.name})" for p in drawn if p is not None] + [""]
    lines += _usage_section(run_dir, env)
    return write_text(run_dir / "report.md", "\n".join(lines))


def _draw_plots(plots_dir: Path, cfg, metrics: dict, kept) -> list:
    encoder, student = kept.encoder, kept.student
    drawn = []
    if metrics["student_model"]["kind"] == "decision_tree":
        if student.model is not None:  # scikit-learn draws the fitted object
            drawn.append(plot_tree_png(student, encoder, cfg.report.plot_depth, plots_dir / "tree.png"))
        elif (plots_dir / "tree.png").is_file():  # --resume reused the phases: the same tree, drawn before
            drawn.append(plots_dir / "tree.png")
    drawn.append(plot_importance(student, encoder.feature_names, cfg.report.top_features, plots_dir / "importance.png"))
    drawn.append(plot_fidelity(metrics["per_class"], plots_dir / "fidelity.png"))
    drawn.append(plot_accuracy(metrics, plots_dir / "accuracy.png"))
    return drawn


def _name(kind: str) -> str:
    return "tree" if kind == "decision_tree" else "L1 logistic regression"


def _summary_section(cfg, metrics: dict) -> list[str]:
    kind = metrics["student_model"]["kind"]
    name = _name(kind)
    data, seeds = metrics["data"], metrics["seeds"]
    nb = cfg.neighbourhood
    baseline = metrics.get("baseline_student")
    lines = [
        f"Teacher **{' + '.join(metrics['teacher_kinds'])}** distilled into a **{kind}** "
        f"({metrics['student_model']['settings']}) on {data['rows']} rows "
        f"({data['train_rows']} train / {data['test_rows']} test), with "
        + (f"{nb.points} synthetic points" if not metrics.get("student_auto") else "synthetic points")
        + f" ({nb.method}, scale {nb.scale}) labelled by the teacher"
        + (" (how many, and soft or hard targets, chosen per seed on validation: see student.auto below)"
           if metrics.get("student_auto") else "")
        + f". The baseline is the same {name} fit on the labels alone. "
        f"Seeds: {', '.join(map(str, seeds))}"
        + (" (each with its own train/test split)." if cfg.data.resplit_each_seed else "."),
        "",
        "## Summary",
        "",
        _table(summary_headers(TABULAR_COLUMNS), summary_rows(metrics, TABULAR_COLUMNS)),
        "",
        "Accuracy, macro F1 and fidelity in %" + (
            f"; mean ± std (population) over {n_seeds(metrics)} seeds." if n_seeds(metrics) > 1 else "."
        ) + " params: tree nodes, or non-zero coefficients and intercepts (a teacher's: the nodes of all its "
        "trees, or its network's parameters); " + speedup_note(metrics) + " Each model is timed from the same rows "
        "(as codes), its own encoding included.",
        "",
        _table(
            ["model", "size (mean)"],
            [[f"distilled {name}", size_text(metrics["student"], kind)]]
            + ([[f"{name} on labels only", size_text(baseline, kind)]] if baseline else []),
            numeric=False,
        ),
        "",
        *([gain_line(metrics, TABULAR_COLUMNS) + ": the distilled model minus the one on labels, by seed.", ""]
          if baseline else []),
        fidelity_line(metrics) + ".",
        "",
        *_size_note(metrics, baseline, kind),
        "Fidelity is the share of points on which the student's top class equals the teacher's: on the test rows, "
        "and on synthetic points drawn around the test rows (never used for fitting).",
        "",
    ]
    if metrics["low_fidelity"]:
        lines += ["**Low fidelity.**"] + [f"- {w}." for w in metrics["low_fidelity"]] + [""]
    else:
        lines += [
            f"Fidelity is at or above {100 * cfg.report.low_fidelity:.0f}% on the test rows and around them: the "
            "student's rules describe what the teacher does on data like this, not beyond it.",
            "",
        ]
    return lines


def _per_class_section(metrics: dict) -> list[str]:
    data = metrics["data"]
    lines = [
        "## Fidelity per class",
        "",
        "Per class of the teacher: how many points it put there (pooled over seeds) and the share the student put "
        "there too.",
        "",
    ]
    rows = []
    for class_name in data["classes"]:
        t, near = metrics["per_class"]["test"][class_name], metrics["per_class"]["neighbourhood"][class_name]
        rows.append([class_name, str(t["n"]), _percent(t["agreement"]), str(near["n"]), _percent(near["agreement"])])
    lines += [_table(["class", "test points", "agreement %", "neighbourhood points", "agreement %"], rows), ""]

    return lines


def _student_section(cfg, metrics: dict, kept, x_train: np.ndarray, tree_drawn: bool) -> list[str]:
    encoder, student = kept.encoder, kept.student
    kind = metrics["student_model"]["kind"]
    spec = student.to_json()
    lines = [f"## The student (seed {kept.seed}, in `student/`)", ""]
    if kind == "decision_tree":
        rules = tree_rules(spec, encoder, encoder.class_names, x_train)
        lines += [
            f"{len(rules)} rules, one per leaf or per subtree whose leaves all predict the same class (all of them in "
            "`student/rules.txt`" + ("; the tree is drawn in `plots/tree.png`" if tree_drawn else "")
            + "). p is the rule's probability of its class; fitting points include the synthetic ones.",
            "",
            _table(
                ["#", "IF", "THEN", "p", "fitting points", "training rows"],
                [
                    [
                        str(i),
                        " AND ".join(r["conditions"]) or "always",
                        r["class"],
                        f"{r['probability']:.2f}",
                        str(r["samples"]),
                        str(r["rows"]),
                    ]
                    for i, r in enumerate(rules[:MAX_RULES_IN_REPORT], 1)
                ],
            ),
            "",
        ]
    else:
        lines += [
            "Non-zero coefficients per standard deviation of the feature, largest first (`student/rules.txt`):",
            "",
            "```",
            coefficients_text(spec, encoder.feature_names, encoder.class_names).strip(),
            "```",
            "",
        ]
    imp = student.importances()
    order = [j for j in np.argsort(-imp)[: cfg.report.top_features] if imp[j] > 0]
    label = "importance" if kind == "decision_tree" else "max |coefficient|"
    lines += [
        f"Features by {label}:",
        "",
        _table(["feature", label], [[encoder.feature_names[j], f"{imp[j]:.4f}"] for j in order]),
        "",
    ]

    return lines


def _data_section(cfg, encoder) -> list[str]:
    lines = ["## Data and encoding", ""]
    imputed = [f"{c.name} ({c.missing} missing → {c.fill:.4g})" for c in encoder.numeric if c.missing]
    lines += [
        f"- Target `{encoder.target}`, classes: {', '.join(encoder.class_names)}.",
        f"- {len(encoder.numeric)} numeric columns; {len(encoder.categorical)} categorical columns encoded "
        f"{encoder.encoding} → {len(encoder.feature_names)} features.",
        f"- Missing numbers imputed with the training {cfg.data.impute}: {', '.join(imputed) or 'none seen'}. "
        "A missing category is the level `(missing)`.",
        f"- A category unseen in training: {encoder.unseen_category}"
        + (
            " (all one-hot columns 0 / ordinal code past the last level)."
            if encoder.unseen_category == "other"
            else " (an error naming the column)."
        ),
        "- Everything above is in `student/encoder.json`; prediction repeats it (`kdkit.interpret.predict_table`).",
        "",
        "## Plots",
        "",
    ]
    return lines


def _usage_section(run_dir: Path, env: dict) -> list[str]:
    skops = (run_dir / "student" / "student.skops").is_file()
    return [
        "## Use the student",
        "",
        "```python",
        "import pandas as pd",
        "from kdkit.interpret import predict_table",
        f"probs = predict_table('{run_dir}', pd.read_csv('new_rows.csv'))  # (N, C) in the order of the classes",
        "```",
        "",
        *(
            [
                "`student/student.skops` and `teachers/member_<i>.skops` hold the scikit-learn objects; skops loads "
                "them once you trust the types it lists (`skops.io.get_untrusted_types(file=...)`, e.g. "
                "`sklearn.tree._tree.Tree`). A `teachers/member_<i>.skops` can be the teacher of a later run "
                "(`kind: skops`, `trusted: [...]`).",
                "",
            ]
            if skops
            else []
        ),
        "## Environment",
        "",
        _table(["", ""], [[k, str(v)] for k, v in env.items()], numeric=False),
        "",
    ]


def _size_note(metrics: dict, baseline: dict | None, kind: str) -> list[str]:
    """Say so when the two trees, under the same limits, did not grow to the same size."""
    if kind != "decision_tree" or not baseline:
        return []
    distilled, labels = mean_of(metrics["student"]["leaves"]), mean_of(baseline["leaves"])
    if distilled <= labels * 1.2:
        return []
    return [
        f"Both trees have the same limits ({metrics['student_model']['settings']}), but the tree on labels stopped at "
        f"{labels:.1f} leaves on average against {distilled:.1f}: its leaves became pure on the few real rows, "
        "while the teacher's soft labels on the synthetic points give the distilled tree more to split.",
        "",
    ]


def auto_section(metrics: dict) -> list[str]:
    """student.auto: how the setting was chosen, each candidate's validation figure and the seeds that chose it,
    and a verdict on validation and on test (with the likely reason when distillation did not pay)."""
    record = metrics["student_auto"]
    metric, n = record["metric"], record["seeds"]
    lines = [
        "## Automatic distillation setting (student.auto)",
        "",
        f"Chosen per seed, before its distilled student was fit, by {record['folds']}-fold stratified "
        "cross-validation within the seed's training split (the test split is never seen; the teacher is fit again "
        f"on each fold's other rows): every candidate below is scored by the {metric} of its held-out predictions, "
        "pooled over the folds, and the best is fit on the whole training split. A tie goes to the simpler "
        "candidate (labels alone first), so each seed's choice is never worse than labels alone on validation. "
        "The candidates are a literal grid, each one scored.",
        "",
        _table(
            ["candidate", f"validation {metric}" + (" (mean ± std over seeds)" if n > 1 else ""), "chosen by seeds"],
            [
                [
                    describe(c["name"]) + (" (as configured)" if c["given"] else ""),
                    _pm(c["validation"]),
                    ", ".join(map(str, c["chosen_by"])) or "—",
                ]
                for c in record["candidates"]
            ],
        ),
        "",
        auto_verdict(metrics),
        "",
    ]
    return lines


def auto_verdict(metrics: dict) -> str:
    """One paragraph: did distillation pay on validation (in how many seeds) and on test; if not, why that may be."""
    record = metrics["student_auto"]
    metric, n, k = record["metric"], record["seeds"], record["distils"]
    name = _name(metrics["student_model"]["kind"])
    chosen = 100 * float(np.mean([r["value"] for r in record["per_seed"]]))
    labels = 100 * float(np.mean([r["labels_only"] for r in record["per_seed"]]))
    figures = f"validation {metric} {chosen:.2f}% against {labels:.2f}% for labels alone (mean over seeds)"
    if k == 0:
        text = (
            f"Distillation did not pay on validation: labels alone scored best in every seed, so the student is the "
            f"{name} on labels alone. {auto_reason(metrics)}"
        )
    elif k == n:
        text = f"Distillation paid on validation in every seed: {figures}."
    else:
        text = (
            f"Distillation paid on validation in {k} of {n} seeds ({figures}); the other seeds keep the {name} on "
            "labels alone."
        )
    if k:
        text += " The chosen figure is the best of several, so it flatters the choice; the test figure does not."
    gain = (metrics.get("gain") or {}).get("accuracy")
    if gain is not None:
        interval = gain_interval(metrics, "accuracy")
        ci = f" (95% CI [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}])" if interval else ""
        text += (
            f" On test, the chosen student minus the one on labels alone: accuracy {100 * gain['mean']:+.2f} "
            f"points{ci}."
        )
    return text


def auto_reason(metrics: dict) -> str:
    """Why distillation may not pay, from the run's own test figures."""
    teacher = mean_of((metrics.get("teacher") or {}).get("accuracy"))
    baseline = mean_of((metrics.get("baseline_student") or {}).get("accuracy"))
    name = _name(metrics["student_model"]["kind"])
    if teacher is None or baseline is None:
        return f"Possible reasons: the {name} may be too small to follow the teacher, or the teacher no better."
    if baseline >= 0.99:
        return f"The data saturates: the {name} on labels alone reaches {100 * baseline:.2f}% on test."
    if teacher - baseline < 0.01:
        return (
            f"The teacher is not better than the {name} on labels alone ({100 * teacher:.2f}% vs {100 * baseline:.2f}% "
            "on test): it has little to teach."
        )
    more = "more depth or leaves (student.tree)" if name == "tree" else "a larger C (student.logistic)"
    return (
        f"The teacher is better ({100 * teacher:.2f}% vs {100 * baseline:.2f}% on test), so the {name} may be too "
        f"small to follow it; try {more}."
    )


def _percent(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{100 * value:.2f}"


def _table(headers: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:" if numeric else "---"] * (len(headers) - 1)) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def plot_tree_png(student, encoder, max_depth: int, path: Path) -> Path:
    """The tree (first max_depth levels) with scikit-learn's plot_tree; soft trees show class probabilities."""
    from sklearn.tree import DecisionTreeClassifier, plot_tree

    model = student.model
    shown = min(max_depth, model.get_depth())
    leaves = min(model.get_n_leaves(), 2**shown)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * leaves), max(4, 1.9 * (shown + 1))))
    try:
        plot_tree(
            model,
            max_depth=max_depth,
            feature_names=encoder.feature_names,
            class_names=[encoder.class_names[c] for c in model.classes_]
            if isinstance(model, DecisionTreeClassifier)
            else None,
            filled=True,
            impurity=False,
            proportion=True,
            precision=2,
            rounded=True,
            fontsize=8,
            ax=ax,
        )
        title = "Distilled tree" + (
            " (value: class probabilities " + ", ".join(encoder.class_names) + ")"
            if not isinstance(model, DecisionTreeClassifier)
            else ""
        )
        ax.set_title(title)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_importance(student, feature_names: list[str], top: int, path: Path) -> Path | None:
    """Bars of the top features: tree importances, or the largest |coefficient| over the classes."""
    imp = student.importances()
    order = [j for j in np.argsort(-imp)[:top] if imp[j] > 0][::-1]
    if not order:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(order) + 1.2))
    try:
        ax.barh([feature_names[j] for j in order], imp[order], color="tab:blue")
        ax.set(
            xlabel="impurity importance" if student.kind == "decision_tree" else "max |coefficient| per std",
            title="What the distilled student uses",
        )
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_fidelity(per_class: dict, path: Path) -> Path:
    """Agreement with the teacher per teacher class, on the test rows and on the neighbourhood."""
    names = list(per_class["test"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.8))
    try:
        for i, (where, colour) in enumerate((("test", "tab:blue"), ("neighbourhood", "tab:orange"))):
            values = [100 * per_class[where][n]["agreement"] for n in names]
            ax.bar(x + (i - 0.5) * 0.38, np.nan_to_num(values), width=0.38, color=colour, label=where)
        ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        ax.set(ylabel="agreement with teacher %", ylim=(0, 105), title="Fidelity per class of the teacher")
        ax.legend(fontsize="small", loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_accuracy(metrics: dict, path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) of teacher, distilled student and label-only student."""
    keys = [
        (model, label, colour)
        for model, label, colour in (
            ("teacher", "teacher", "tab:purple"),
            ("student", "distilled", "tab:blue"),
            ("baseline_student", "labels only", "tab:gray"),
        )
        if metrics.get(model)
    ]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    try:
        means = [100 * mean_of(metrics[k]["accuracy"]) for k, _, _ in keys]
        stds = [100 * std_of(metrics[k]["accuracy"]) for k, _, _ in keys]
        ax.bar([n for _, n, _ in keys], means, yerr=stds, capsize=4, color=[c for _, _, c in keys])
        low = max(0.0, min(means) - 10)
        ax.set(ylabel="test accuracy %", ylim=(low, 100), title="Accuracy on the test rows")
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)
