"""The interpret run's report: report.md, its PNGs, and the summary table the CLI prints.

The terminal table and report.md take their cells from `summary_rows`, so the two never disagree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdkit.atomic import write_text
from kdkit.report.plots import _save, plt

MISSING = "—"
MAX_RULES_IN_REPORT = 40


def _pm(summary: dict, key: str, percent: bool = True) -> str:
    entry = summary.get(key)
    if entry is None or not math.isfinite(entry["mean"]):
        return MISSING
    if percent:
        return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def _size(summary: dict, prefix: str, kind: str) -> str:
    """Mean size over seeds (sizes hardly vary, so no spread): rules / leaves / depth, or non-zero coefficients."""
    if kind == "decision_tree":
        rules, leaves = summary[prefix + "rules"]["mean"], summary[prefix + "leaves"]["mean"]
        depth = max(summary[prefix + "depth"]["per_seed"])
        return f"{rules:.1f} rules / {leaves:.1f} leaves / depth {depth:.0f}"
    return f"{summary[prefix + 'nonzero']['mean']:.1f} of {summary[prefix + 'features']['mean']:.0f} features"


def summary_headers() -> list[str]:
    return ["model", "test accuracy %", "macro F1 %", "fidelity test %", "fidelity neighbourhood %", "size (mean)"]


def summary_rows(metrics: dict) -> list[list[str]]:
    """Teacher, distilled student, student on labels only: mean ± std over seeds."""
    s, kind = metrics["summary"], metrics["student"]["kind"]
    name = "tree" if kind == "decision_tree" else "L1 logistic"
    teacher = "+".join(metrics["teacher"]["members"])
    return [
        [f"teacher ({teacher})", _pm(s, "teacher_accuracy"), _pm(s, "teacher_f1_macro"), MISSING, MISSING, MISSING],
        [
            f"distilled {name}",
            _pm(s, "student_accuracy"),
            _pm(s, "student_f1_macro"),
            _pm(s, "fidelity_test"),
            _pm(s, "fidelity_neighbourhood"),
            _size(s, "student_", kind),
        ],
        [
            f"{name} on labels only",
            _pm(s, "label_student_accuracy"),
            _pm(s, "label_student_f1_macro"),
            _pm(s, "label_student_fidelity_test"),
            _pm(s, "label_student_fidelity_neighbourhood"),
            _size(s, "label_student_", kind),
        ],
    ]


def gain_line(metrics: dict) -> str:
    """The distilled student's accuracy minus the label-only student's, paired by seed."""
    s = metrics["summary"]
    diffs = np.array(s["student_accuracy"]["per_seed"]) - np.array(s["label_student_accuracy"]["per_seed"])
    n = len(diffs)
    return (
        f"distilled − labels only: {100 * diffs.mean():+.2f} ± {100 * diffs.std():.2f} accuracy points "
        f"(paired over {n} seed{'s' if n != 1 else ''}); fidelity on test {_pm(s, 'fidelity_test')} %"
    )


def summary_table(metrics: dict):
    """The summary as a rich Table, for the terminal."""
    from rich.table import Table

    n = len(metrics["seeds"])
    table = Table(title=f"kdkit interpret: mean ± std over {n} seed{'s' if n != 1 else ''}")
    for i, header in enumerate(summary_headers()):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in summary_rows(metrics):
        table.add_row(*row)
    return table


# ---------------------------------------------------------------------------------------------------------------
# report.md


def write_interpret_report(run_dir: Path, *, cfg, metrics: dict, saved: dict, rules: list[dict] | None, env: dict):
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png; return the path of report.md."""
    encoder, student = saved["encoder"], saved["student"]
    plots_dir = run_dir / "plots"
    drawn = []
    if student.kind == "decision_tree":
        drawn.append(plot_tree_png(student, encoder, cfg.report.plot_depth, plots_dir / "tree.png"))
    drawn.append(plot_importance(student, encoder.feature_names, cfg.report.top_features, plots_dir / "importance.png"))
    drawn.append(plot_fidelity(metrics["per_class"], plots_dir / "fidelity.png"))
    drawn.append(plot_accuracy(metrics, plots_dir / "accuracy.png"))

    lines = [f"# kdkit interpret: {cfg.run.name}", ""]
    lines += [
        f"Teacher **{' + '.join(metrics['teacher']['members'])}** distilled into a **{student.kind}** "
        f"({metrics['student']['settings']}) on {metrics['data']['rows']} rows "
        f"({metrics['data']['train_rows']} train / {metrics['data']['test_rows']} test), with "
        f"{cfg.neighbourhood.points} synthetic points ({cfg.neighbourhood.method}, scale {cfg.neighbourhood.scale}) "
        f"labelled by the teacher. Seeds: {', '.join(map(str, metrics['seeds']))}.",
        "",
        "## Summary",
        "",
        _table(summary_headers(), summary_rows(metrics)),
        "",
        gain_line(metrics) + ".",
        "",
        *_size_note(metrics),
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
    lines += [
        "## Fidelity per class",
        "",
        "Per class of the teacher: how many points it put there (pooled over "
        "seeds) and the share the student put there too.",
        "",
    ]
    rows = []
    for name in metrics["data"]["classes"]:
        t, nb = metrics["per_class"]["test"][name], metrics["per_class"]["neighbourhood"][name]
        rows.append([name, str(t["n"]), _percent(t["agreement"]), str(nb["n"]), _percent(nb["agreement"])])
    lines += [_table(["class", "test points", "agreement %", "neighbourhood points", "agreement %"], rows), ""]

    lines += [f"## The student (seed {metrics['student']['saved_seed']})", ""]
    if rules is not None:
        shown = rules[:MAX_RULES_IN_REPORT]
        lines += [
            f"{len(rules)} rules, one per leaf or per subtree whose leaves all predict the same class (all of them, "
            "and scikit-learn's outline, in `rules.txt`; the tree is drawn in `plots/tree.png`). p is the rule's "
            "probability of its class; fitting points include the synthetic ones.",
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
                    for i, r in enumerate(shown, 1)
                ],
            ),
            "",
        ]
    else:
        lines += [
            "Non-zero coefficients per standard deviation of the feature, largest first (`rules.txt`):",
            "",
            "```",
            (run_dir / "rules.txt").read_text().strip(),
            "```",
            "",
        ]
    imp = student.importances()
    order = [j for j in np.argsort(-imp)[: cfg.report.top_features] if imp[j] > 0]
    label = "importance" if student.kind == "decision_tree" else "max |coefficient|"
    lines += [
        f"Features by {label}:",
        "",
        _table(["feature", label], [[encoder.feature_names[j], f"{imp[j]:.4f}"] for j in order]),
        "",
    ]

    lines += ["## Data and encoding", ""]
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
        "- Everything above is in `encoder.json`; prediction repeats it (`kdkit.interpret.predict_table`).",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in drawn if p is not None] + [""]
    lines += [
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
                "`student.skops` and `teacher/member_<i>.skops` hold the scikit-learn objects; skops loads them "
                "once you trust the types it lists (`skops.io.get_untrusted_types(file=...)`, e.g. "
                "`sklearn.tree._tree.Tree`). A `teacher/member_<i>.skops` can be the teacher of a later run "
                "(`kind: skops`, `trusted: [...]`).",
                "",
            ]
            if env.get("skops_files")
            else []
        ),
        "## Environment",
        "",
        _table(["", ""], [[k, str(v)] for k, v in env.items()], numeric=False),
        "",
    ]
    return write_text(run_dir / "report.md", "\n".join(lines))


def _size_note(metrics: dict) -> list[str]:
    """Say so when the two students, under the same limits, did not grow to the same size."""
    s = metrics["summary"]
    if metrics["student"]["kind"] != "decision_tree":
        return []
    distilled, labels = s["student_leaves"]["mean"], s["label_student_leaves"]["mean"]
    if distilled <= labels * 1.2:
        return []
    return [
        f"Both trees have the same limits ({metrics['student']['settings']}), but the tree on labels stopped at "
        f"{labels:.1f} leaves on average against {distilled:.1f}: its leaves became pure on the few real rows, "
        "while the teacher's soft labels on the synthetic points give the distilled tree more to split.",
        "",
    ]


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
    s = metrics["summary"]
    keys = [
        ("teacher_accuracy", "teacher", "tab:purple"),
        ("student_accuracy", "distilled", "tab:blue"),
        ("label_student_accuracy", "labels only", "tab:gray"),
    ]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    try:
        means = [100 * s[k]["mean"] for k, _, _ in keys]
        stds = [100 * s[k]["std"] for k, _, _ in keys]
        ax.bar([n for _, n, _ in keys], means, yerr=stds, capsize=4, color=[c for _, _, c in keys])
        low = max(0.0, min(means) - 10)
        ax.set(ylabel="test accuracy %", ylim=(low, 100), title="Accuracy on the test rows")
        ax.grid(axis="y", alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)
