"""kdkit sweep's report: sweep.md (the table of points, the frontier, the smallest student within tolerance) and
the frontier plots."""

from __future__ import annotations

from kdkit.report.plots import frontier_plot

__all__ = ["frontier_plot", "smallest_line", "sweep_markdown", "sweep_table"]

def smallest_line(summary: dict) -> str:
    """One line: the smallest distilled student within tolerance of the teacher, or that there is none."""
    key, tol, teacher = summary["metric"], summary["tolerance"], summary["teacher"]
    gap = f"{100 * tol:g} point{'' if tol == 0.01 else 's'}" if not summary["lower_is_better"] else f"{100 * tol:g}%"
    name = summary["smallest_within_tolerance"]
    if teacher is None:
        return "sweep: no teacher figure to compare with"
    if name is None:
        best = max((r for r in summary["rows"] if r["student"] is not None),
                   key=lambda r: -r["student"] if summary["lower_is_better"] else r["student"], default=None)
        where = f"; the best is {best['name']} at {_quality(best['student'], key)}" if best else ""
        return f"sweep: no distilled student within {gap} of the teacher's {key} ({_quality(teacher, key)}){where}"
    row = next(r for r in summary["rows"] if r["name"] == name)
    return (f"sweep: smallest distilled student within {gap} of the teacher's {key} ({_quality(teacher, key)}): "
            f"{name}, {_quality(row['student'], key)}, {row['params']:,} parameters, {row['latency_ms']:.3g} ms")


def _quality(value: float | None, key: str) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}%" if key in ("accuracy", "f1_macro", "agreement") else f"{value:.4g}"


def sweep_markdown(summary: dict) -> str:
    """sweep.md: the table of points, the frontier marks, the smallest student within tolerance, the plots."""
    key = summary["metric"]
    on_front = set(summary["frontier"]["latency_ms"]["student"])
    lines = [
        "# Sweep",
        "",
        f"Every point is a run of its own (`points/`): the distilled student and the same student on labels alone, "
        f"over the run's seeds; {key} on the test split, mean ± std (population) over seeds; the gain is paired "
        "by seed with its 95% interval. Cost: the distilled student's, measured as in every run. ★: on the "
        "latency frontier of the distilled students.",
        "",
        f"| point | params | latency ms | {key} distilled | {key} labels only | gain | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    scale = 100 if key in ("accuracy", "f1_macro", "agreement") else 1
    for r in summary["rows"]:
        ci = r["gain_ci95"]
        star = " ★" if r["name"] in on_front else ""
        gain = "—" if r["gain"] is None else f"{scale * r['gain']:+.2f}"
        interval = "—" if not ci else f"[{scale * ci[0]:+.2f}, {scale * ci[1]:+.2f}]"
        lines.append(
            f"| {r['name']}{star} | {_int(r['params'])} | {_num(r['latency_ms'])} | "
            f"{_pm(r['student'], r['student_std'], key)} | {_pm(r['baseline'], r['baseline_std'], key)} | "
            f"{gain} | {interval} |"
        )
    verdict = smallest_line(summary).removeprefix("sweep: ")
    lines += ["", f"Teacher: {_quality(summary['teacher'], key)}. {verdict[:1].upper()}{verdict[1:]}.", ""]
    lines += [f"![{p}]({p})" for p in summary.get("plots", [])]
    return "\n".join(lines) + "\n"


def _pm(mean: float | None, std: float | None, key: str) -> str:
    if mean is None:
        return "—"
    scale = 100 if key in ("accuracy", "f1_macro", "agreement") else 1
    return f"{scale * mean:.2f} ± {scale * (std or 0.0):.2f}"


def _int(value) -> str:
    return "—" if value is None else f"{int(value):,}"


def _num(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def sweep_table(summary: dict):
    """The terminal's table of points (rich), the same columns as sweep.md."""
    from rich.table import Table

    key = summary["metric"]
    on_front = set(summary["frontier"]["latency_ms"]["student"])
    scale = 100 if key in ("accuracy", "f1_macro", "agreement") else 1
    table = Table(title="kdkit sweep (★: on the latency frontier of the distilled students)")
    for i, header in enumerate(["point", "params", "latency ms", f"{key} distilled", f"{key} labels only", "gain",
                                "95% CI"]):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r in summary["rows"]:
        ci = r["gain_ci95"]
        table.add_row(
            r["name"] + (" ★" if r["name"] in on_front else ""),
            _int(r["params"]),
            _num(r["latency_ms"]),
            _pm(r["student"], r["student_std"], key),
            _pm(r["baseline"], r["baseline_std"], key),
            "—" if r["gain"] is None else f"{scale * r['gain']:+.2f}",
            "—" if not ci else f"[{scale * ci[0]:+.2f}, {scale * ci[1]:+.2f}]",
        )
    return table
