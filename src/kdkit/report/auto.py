"""report.md's section for `distill.auto`: what was tried on validation, what was chosen, what it gave on test, and
when distillation did not pay, the likely reason."""

from __future__ import annotations

from kdkit.evaluate.schema import mean_of
from kdkit.report.table import gain_interval

SETTINGS = (("share", "teacher share"), ("temperature", "temperature"), ("feature_scale", "feature-loss scale"))


def auto_section(metrics: dict) -> str:
    """Markdown: the trials (best first), the choice against labels alone and the config as given, the test
    figures of the distilled student and the baseline, and a verdict."""
    record = metrics["auto"]
    metric, chosen = record["metric"], record["chosen"]
    names = [(key, header) for key, header in SETTINGS if key in chosen]
    lines = [
        "",
        "## Automatic distillation setting (distill.auto)",
        "",
        f"Chosen on the validation split by the mean best validation {metric} over seeds {record['seeds']}, before "
        "the run's seeds trained. Trial 0 is the config as given, trial 1 labels alone (teacher share 0, feature "
        "losses off): the choice is never worse than labels alone on validation.",
        "",
        "| trial | " + " | ".join(header for _, header in names) + f" | validation {metric} | state |",
        "|---" * (len(names) + 3) + "|",
    ]
    sign = -1 if record["direction"] == "maximize" else 1
    done = sorted(record["trials"], key=lambda t: (t["value"] is None, sign * (t["value"] or 0.0), t["number"]))
    for t in done:
        mark = " **(chosen)**" if t["number"] == chosen["number"] else ""
        label = {0: " (as given)", 1: " (labels alone)"}.get(t["number"], "")
        cells = [_fmt(t.get(key)) for key, _ in names]
        lines.append(f"| {t['number']}{label}{mark} | " + " | ".join(cells) + f" | {_fmt(t['value'])} | {t['state']} |")
    lines += ["", verdict(metrics)]
    return "\n".join(lines) + "\n"


def verdict(metrics: dict) -> str:
    """One paragraph: did distillation pay on validation and on test; if not, why that may be."""
    record = metrics["auto"]
    if record["distils"]:
        text = (
            f"Distillation paid on validation: {_fmt(record['chosen']['value'])} against "
            f"{_fmt(record['labels_only'])} for labels alone."
        )
    else:
        text = (
            "Distillation did not pay on validation: labels alone scored best, so the student was trained on labels "
            f"alone. {reason(metrics)}"
        )
    gain = (metrics.get("gain") or {}).get("accuracy") or (metrics.get("gain") or {}).get("perplexity")
    if gain is not None:
        key = "accuracy" if "accuracy" in metrics["gain"] else "perplexity"
        interval = gain_interval(metrics, key)
        scale, unit = (100, " points") if key == "accuracy" else (1, "")
        ci = f" (95% CI [{scale * interval[0]:+.2f}, {scale * interval[1]:+.2f}])" if interval else ""
        text += f" On test, the distilled student minus the baseline: {key} {scale * gain['mean']:+.2f}{unit}{ci}."
    return text


def reason(metrics: dict) -> str:
    """Why distillation may not pay, from the run's own test figures."""
    teacher = mean_of((metrics.get("teacher") or {}).get("accuracy"))
    baseline = mean_of((metrics.get("baseline_student") or {}).get("accuracy"))
    if teacher is None or baseline is None:
        return "Possible reasons: the student may be too small to follow the teacher, or the teacher no better."
    if baseline >= 0.99:
        return f"The data saturates: the student on labels alone reaches {100 * baseline:.2f}% on test."
    if teacher - baseline < 0.01:
        return (
            f"The teacher is not better than the student on labels alone ({100 * teacher:.2f}% vs "
            f"{100 * baseline:.2f}% on test): it has little to teach."
        )
    return (
        f"The teacher is better ({100 * teacher:.2f}% vs {100 * baseline:.2f}% on test), so the student may be too "
        "small (or its budget too short) to follow it; try a larger student or more epochs."
    )


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"
