"""A sweep's frontier: which students are worth their cost, and the smallest that stays close to the teacher.
Pure Python on the rows kdkit sweep collects ({name, student, baseline, params, latency_ms, ...})."""

from __future__ import annotations

import math

LOWER_IS_BETTER = ("perplexity", "nll", "loss", "ece", "kl", "bits_per_byte")
COSTS = (("latency_ms", "latency (ms, batch 1)"), ("params", "parameters"))


def teacher_quality(rows: list[dict]) -> float | None:
    values = [r["teacher"] for r in rows if r["teacher"] is not None]
    return values[0] if values else None


def better(a: float, b: float, key: str) -> bool:
    """a is strictly better than b for this metric."""
    return a < b if key in LOWER_IS_BETTER else a > b


def frontier(rows: list[dict], quality: str, cost: str, key: str) -> list[str]:
    """Names of the Pareto-optimal points: no other point is at most as costly and at least as good with one of
    the two strict. Points without the figures are left out."""
    points = [r for r in rows if r.get(quality) is not None and r.get(cost) is not None]
    chosen = []
    for r in points:
        dominated = any(
            o is not r
            and o[cost] <= r[cost]
            and not better(r[quality], o[quality], key)
            and (o[cost] < r[cost] or better(o[quality], r[quality], key))
            for o in points
        )
        if not dominated:
            chosen.append(r["name"])
    return chosen


def within(value: float, teacher: float, tolerance: float, key: str) -> bool:
    """Within tolerance of the teacher: accuracy-like metrics at most `tolerance` below it (absolute, 0.01 = one
    point); lower-is-better metrics at most (1 + tolerance) × the teacher's."""
    if key in LOWER_IS_BETTER:
        return value <= teacher * (1 + tolerance)
    return value >= teacher - tolerance


def summarize(rows: list[dict], key: str, tolerance: float, teacher: float | None) -> dict:
    """The sweep's figures: rows, the frontiers of distilled and labels-only students for each cost, and the
    smallest distilled student (fewest parameters, then lowest latency) within tolerance of the teacher."""
    fronts = {
        cost: {"student": frontier(rows, "student", cost, key), "baseline": frontier(rows, "baseline", cost, key)}
        for cost, _ in COSTS
    }
    smallest = None
    if teacher is not None:
        ok = [r for r in rows if r["student"] is not None and within(r["student"], teacher, tolerance, key)]
        if ok:
            smallest = min(ok, key=lambda r: (r["params"] or math.inf, r["latency_ms"] or math.inf))["name"]
    return {
        "metric": key,
        "lower_is_better": key in LOWER_IS_BETTER,
        "teacher": teacher,
        "tolerance": tolerance,
        "rows": rows,
        "frontier": fronts,
        "smallest_within_tolerance": smallest,
    }
