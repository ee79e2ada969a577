"""metrics.json: one schema for every task (docs/metrics.md), the functions that build it, and the accessors that
read it.

    {"schema": 1, "task": ..., "seeds": [...],
     "teacher": {metric: value}, "baseline_student": {metric: value}, "student": {metric: value},
     "gain": {metric: {"mean", "std", "n", "ci95"}}, "cost": {model: C}, "best_seed": {...}, ...task extras}

A value is a plain number when the run has one seed, and {"mean", "std" (population, ddof=0), "per_seed": [one
number per seed, in `seeds` order]} with several. Readers never look inside a value themselves: mean_of, std_of and
per_seed_of accept either form, so a report reads a one-seed run and a five-seed run the same way.

Pure Python (no torch): the report reads the schema without loading the evaluation's heavy dependencies.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

SCHEMA_VERSION = 1
MODELS = ("teacher", "baseline_student", "student")
# C: every model's cost, measured the same way (evaluate.cost.measure_cost) and compared with the teacher's.
COST_REQUIRED = ("params", "size_mb", "latency_ms", "throughput", "speedup_latency", "speedup_throughput")
COST_OPTIONAL = ("tokens_per_s", "batch_size", "members")
SCHEMA_KEYS = ("schema", "task", "seeds", *MODELS, "gain", "cost", "best_seed")

Value = float | int | dict  # a number, or {"mean", "std", "per_seed"}


# ---------------------------------------------------------------------------------------------------------------
# Building


def spread(values: Sequence[float]) -> dict:
    """{"mean", "std" (population, ddof=0), "per_seed": values as floats}. A NaN makes mean and std NaN."""
    if not values:
        raise ValueError("spread needs at least one value")
    floats = [float(v) for v in values]
    mean = math.fsum(floats) / len(floats)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in floats) / len(floats))
    return {"mean": mean, "std": std, "per_seed": floats}


def model_entry(per_seed: Sequence[Mapping[str, Any]]) -> dict:
    """One model's metrics over the run's seeds: {metric: number} for one seed, {metric: spread(...)} for several.

    per_seed: one dict of metrics per seed, in the run's seed order. A metric is a key whose value is a real number
    (int, float, numpy scalar; not bool) in every seed's dict; anything else (a phase name, a list) is left out.
    """
    if not per_seed:
        raise ValueError("model_entry needs at least one seed's metrics")
    keys = [key for key in per_seed[0] if all(_is_number(seed.get(key)) for seed in per_seed)]
    if len(per_seed) == 1:
        return {key: _plain(per_seed[0][key]) for key in keys}
    return {key: spread([seed[key] for seed in per_seed]) for key in keys}


def paired_gain(
    student_per_seed: Sequence[Mapping[str, Any]],
    baseline_per_seed: Sequence[Mapping[str, Any]],
    keys: Sequence[str] | None = None,
) -> dict:
    """{metric: {"mean", "std", "n", "ci95"}} of student − baseline, paired seed by seed (same position = same seed).

    keys: the metrics to compare (each must be a number in every seed of both); None: every metric both have.
    Pairing removes what the seed does to both (initialisation, data order), so the spread is that of the gain.
    ci95: the 95% interval of the mean difference, [low, high] (paired_interval); None with one seed.
    """
    if len(student_per_seed) != len(baseline_per_seed):
        raise ValueError(
            f"paired_gain pairs seeds: {len(student_per_seed)} student seeds vs {len(baseline_per_seed)} baseline "
            "seeds; expected as many of each"
        )
    if not student_per_seed:
        raise ValueError("paired_gain needs at least one seed")
    both = [*student_per_seed, *baseline_per_seed]
    if keys is None:
        keys = [key for key in student_per_seed[0] if all(_is_number(d.get(key)) for d in both)]
    result = {}
    for key in keys:
        bad = [d.get(key) for d in both if not _is_number(d.get(key))]
        if bad:
            raise ValueError(f"paired_gain: {key!r} is {bad[0]!r} in some seed; expected a number in every seed")
        differences = [float(s[key]) - float(b[key]) for s, b in zip(student_per_seed, baseline_per_seed, strict=True)]
        d = spread(differences)
        result[key] = {"mean": d["mean"], "std": d["std"], "n": len(differences), "ci95": paired_interval(differences)}
    return result


def paired_interval(differences: Sequence[float], level: float = 0.95) -> list[float] | None:
    """[low, high]: Student's t interval of the mean of paired differences, mean ± t(level, n−1)·s/√n with s the
    sample standard deviation (ddof=1). None with fewer than two differences (no spread to estimate); a NaN gives NaNs.

    The interval answers "could the gain be zero?": it excludes 0 when the paired t-test rejects no-gain at 1 − level.
    """
    n = len(differences)
    if n < 2:
        return None
    from scipy.stats import t as student_t  # scipy comes with scikit-learn; imported when a gain is built

    floats = [float(v) for v in differences]
    mean = math.fsum(floats) / n
    sample_std = math.sqrt(math.fsum((v - mean) ** 2 for v in floats) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sample_std / math.sqrt(n)
    return [mean - half, mean + half]


def with_speedups(costs: Mapping[str, Mapping[str, Any]], teacher: str = "teacher") -> dict:
    """A copy of costs ({model: C}) with speedup_latency = teacher latency_ms / this latency_ms (batch 1) and
    speedup_throughput = this throughput / teacher throughput (at the eval batch) added to every model; the
    teacher's are 1.0. Above 1: faster than the teacher. Re-applying it recomputes the same numbers."""
    if teacher not in costs:
        raise ValueError(f"with_speedups: no {teacher!r} among the costs ({', '.join(costs)}); speed-ups need it")
    t = costs[teacher]
    out = {}
    for name, c in costs.items():
        c = dict(c)
        if name == teacher:
            c["speedup_latency"], c["speedup_throughput"] = 1.0, 1.0
        else:
            # A stub or a tiny model can time at 0 on a coarse clock; the floor keeps the ratio finite.
            c["speedup_latency"] = float(t["latency_ms"]) / max(float(c["latency_ms"]), 1e-12)
            c["speedup_throughput"] = float(c["throughput"]) / max(float(t["throughput"]), 1e-12)
        out[name] = c
    return out


def assemble(
    task: str,
    seeds: Sequence[int],
    teacher: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    student_per_seed: Sequence[Mapping[str, Any]],
    baseline_per_seed: Sequence[Mapping[str, Any]] | None,
    cost: Mapping[str, Mapping[str, Any]],
    gain_keys: Sequence[str] | None,
    best_seed: Mapping[str, Any] | None,
    **extras: Any,
) -> dict:
    """metrics.json's content, in the schema of docs/metrics.md.

    task: the task's name ("classification", "causal_lm", "tabular"). seeds: the run's seeds, in training order.
    teacher: one dict of the teacher's metrics (a list of per-seed dicts when the task refits it per seed).
    student_per_seed / baseline_per_seed: one dict of metrics per seed, in `seeds` order (non-numbers are dropped);
    baseline_per_seed None or empty: no baseline was trained, so no "baseline_student" and no "gain".
    cost: {"teacher": C, "student": C, "baseline_student": C} from evaluate.cost.measure_cost; speed-ups are
    (re)computed here with with_speedups, so every run uses the one definition.
    gain_keys: the metrics whose paired gain is reported (None: every metric student and baseline share).
    best_seed: {"phase", "seed", "by", "value"}: the seed whose student the run keeps, or None (no choice made).
    extras: task-specific top-level entries ("data", "teacher_cache", "robustness", ...); None values are left out.
    """
    seeds = [int(s) for s in seeds]
    for name, per_seed in (("student_per_seed", student_per_seed), ("baseline_per_seed", baseline_per_seed or None)):
        if per_seed is not None and len(per_seed) != len(seeds):
            raise ValueError(f"assemble: {name} has {len(per_seed)} entries; expected one per seed of {seeds}")
    clash = sorted(set(extras) & set(SCHEMA_KEYS))
    if clash:
        raise ValueError(f"assemble: extras {clash} would overwrite schema entries; pass them as arguments")
    teacher_entry = model_entry([teacher] if isinstance(teacher, Mapping) else list(teacher))
    metrics: dict[str, Any] = {"schema": SCHEMA_VERSION, "task": task, "seeds": seeds, "teacher": teacher_entry}
    if baseline_per_seed:
        metrics["baseline_student"] = model_entry(baseline_per_seed)
    metrics["student"] = model_entry(student_per_seed)
    if baseline_per_seed:
        metrics["gain"] = paired_gain(student_per_seed, baseline_per_seed, gain_keys)
    metrics["cost"] = with_speedups(cost)
    if best_seed is not None:
        metrics["best_seed"] = dict(best_seed)
    metrics.update({key: value for key, value in extras.items() if value is not None})
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Reading: every reader goes through these, whatever the number of seeds.


def mean_of(value: Value | None) -> float | None:
    """The number, or the mean over seeds; None stays None (a metric the run does not have)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return float(value["mean"])
    return float(value)


def std_of(value: Value | None) -> float | None:
    """The population std over seeds; 0.0 for a plain number (one seed); None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return float(value["std"])
    return 0.0


def per_seed_of(value: Value | None) -> list[float]:
    """The value of each seed in `seeds` order: [number] for a plain number; [] for None."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [float(v) for v in value["per_seed"]]
    return [float(value)]


def n_seeds(metrics: Mapping[str, Any]) -> int:
    """How many seeds the run trained (1 for a metrics dict without "seeds")."""
    return len(metrics.get("seeds") or [None])


def cost_of(metrics: Mapping[str, Any], model: str, key: str) -> float | None:
    """metrics["cost"][model][key], or None when the run did not measure it."""
    value = ((metrics.get("cost") or {}).get(model) or {}).get(key)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------------------
# Checking


def check_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise ValueError naming every way `metrics` departs from the schema (docs/metrics.md); return None if none.

    Checks: the schema version; task; seeds (distinct ints); the models (numbers, or {mean, std, per_seed} with one
    value per seed whose mean and population std match); gain present exactly when a baseline is (n = number of
    seeds, keys that both students have); cost for every model present, each with the required keys and no unknown
    ones, speed-ups consistent with the latencies and throughputs (the teacher's 1.0); best_seed's fields.
    """
    problems: list[str] = []
    add = problems.append
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics: expected a dict, got {type(metrics).__name__}")
    for key in ("schema", "task", "seeds", "teacher", "student", "cost"):
        if key not in metrics:
            add(f"{key}: missing")
    if "schema" in metrics and metrics["schema"] != SCHEMA_VERSION:
        add(f"schema: {metrics['schema']!r}, expected {SCHEMA_VERSION}")
    # Any task name is accepted: a new task is a new file in tasks/ and must not need an edit here.
    if "task" in metrics and not (isinstance(metrics["task"], str) and metrics["task"]):
        add(f"task: {metrics['task']!r}, expected a task name")
    seeds = metrics.get("seeds")
    n = None
    if "seeds" in metrics:
        if not (
            isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            add(f"seeds: {seeds!r}, expected a non-empty list of ints")
        elif len(set(seeds)) != len(seeds):
            add(f"seeds: {seeds!r} repeats a seed")
        else:
            n = len(seeds)
    present = [m for m in MODELS if m in metrics]
    for model in present:
        _check_model(metrics[model], model, n, problems, teacher=model == "teacher")
    _check_gain(metrics, n, problems)
    _check_cost(metrics.get("cost"), present, problems)
    best = metrics.get("best_seed")
    if best is not None:
        if not isinstance(best, Mapping) or set(best) != {"phase", "seed", "by", "value"}:
            add(f"best_seed: {best!r}, expected {{'phase', 'seed', 'by', 'value'}}")
        else:
            if not isinstance(best["phase"], str) or not isinstance(best["by"], str):
                add(f"best_seed: phase {best['phase']!r} and by {best['by']!r} must be strings")
            if isinstance(seeds, list) and best["seed"] not in seeds:
                add(f"best_seed.seed: {best['seed']!r} is not one of seeds {seeds}")
            if best["value"] is not None and not _is_number(best["value"]):
                add(f"best_seed.value: {best['value']!r}, expected a number")
    if problems:
        raise ValueError("metrics do not follow the schema (docs/metrics.md): " + "; ".join(problems))


def _check_model(entry: Any, model: str, n: int | None, problems: list[str], teacher: bool) -> None:
    if not isinstance(entry, Mapping) or not entry:
        problems.append(f"{model}: {entry!r}, expected a dict of metrics")
        return
    for key, value in entry.items():
        where = f"{model}.{key}"
        if _is_number(value):
            # One seed: plain numbers. The teacher is one model, so plain numbers whatever the seeds.
            if n is not None and n > 1 and not teacher:
                problems.append(f"{where}: {value!r} is a plain number, but the run has {n} seeds")
            continue
        if not isinstance(value, Mapping) or set(value) != {"mean", "std", "per_seed"}:
            problems.append(f"{where}: {value!r}, expected a number or {{'mean', 'std', 'per_seed'}}")
            continue
        per_seed = value["per_seed"]
        if not isinstance(per_seed, list) or not all(_is_number(v) for v in per_seed):
            problems.append(f"{where}.per_seed: {per_seed!r}, expected a list of numbers")
            continue
        if n is not None and len(per_seed) != n:
            problems.append(f"{where}.per_seed: {len(per_seed)} values, expected {n} (one per seed in seeds)")
            continue
        if n == 1:
            problems.append(f"{where}: {{mean, std, per_seed}} in a one-seed run; expected the plain number")
            continue
        if not (_is_number(value["mean"]) and _is_number(value["std"])):
            problems.append(f"{where}: mean {value['mean']!r} and std {value['std']!r} must be numbers")
            continue
        expected = spread(per_seed)
        for stat in ("mean", "std"):
            if not _close(value[stat], expected[stat]):
                problems.append(
                    f"{where}.{stat}: {value[stat]!r}, but per_seed gives {expected[stat]!r} (population std, ddof=0)"
                )


def _check_gain(metrics: Mapping[str, Any], n: int | None, problems: list[str]) -> None:
    has_baseline, gain = "baseline_student" in metrics, metrics.get("gain")
    if gain is None:
        if has_baseline:
            problems.append("gain: missing, but a baseline_student is present (expected the paired gain)")
        return
    if not has_baseline:
        problems.append("gain: present without a baseline_student (nothing to pair with)")
        return
    if not isinstance(gain, Mapping):
        problems.append(f"gain: {gain!r}, expected {{metric: {{mean, std, n, ci95}}}}")
        return
    for key, entry in gain.items():
        where = f"gain.{key}"
        if not isinstance(entry, Mapping) or set(entry) - {"ci95"} != {"mean", "std", "n"}:
            problems.append(f"{where}: {entry!r}, expected {{'mean', 'std', 'n', 'ci95'}} (no ci95 in older runs)")
            continue
        if not (_is_number(entry["mean"]) and _is_number(entry["std"])):
            problems.append(f"{where}: mean {entry['mean']!r} and std {entry['std']!r} must be numbers")
        if n is not None and entry["n"] != n:
            problems.append(f"{where}.n: {entry['n']!r}, expected {n} (one pair per seed)")
        for model in ("student", "baseline_student"):
            if isinstance(metrics.get(model), Mapping) and key not in metrics[model]:
                problems.append(f"{where}: {model} has no {key!r} metric to pair")
        try:
            student = per_seed_of(metrics["student"][key])
            baseline = per_seed_of(metrics["baseline_student"][key])
        except (KeyError, TypeError, ValueError):
            continue  # reported above
        if len(student) == len(baseline) == n and _is_number(entry["mean"]) and _is_number(entry["std"]):
            differences = [s - b for s, b in zip(student, baseline)]
            expected = spread(differences)
            for stat in ("mean", "std"):
                if not _close(entry[stat], expected[stat]):
                    problems.append(
                        f"{where}.{stat}: {entry[stat]!r}, but the paired per-seed differences give {expected[stat]!r}"
                    )
            expected_interval = paired_interval(differences)
            if "ci95" in entry and not _same_interval(entry["ci95"], expected_interval):
                problems.append(
                    f"{where}.ci95: {entry['ci95']!r}, but the paired per-seed differences give {expected_interval!r}"
                )


def _check_cost(cost: Any, present: list[str], problems: list[str]) -> None:
    if cost is None:
        return  # reported as missing already
    if not isinstance(cost, Mapping):
        problems.append(f"cost: {cost!r}, expected {{model: C}}")
        return
    for model in present:
        if model not in cost:
            problems.append(f"cost.{model}: missing (every model in the metrics has its cost)")
    for model in cost:
        if model not in present:
            problems.append(f"cost.{model}: a cost for a model the metrics do not have")
    for model, c in cost.items():
        if not isinstance(c, Mapping):
            problems.append(f"cost.{model}: {c!r}, expected a dict")
            continue
        for key in COST_REQUIRED:
            if not _is_number(c.get(key)):
                problems.append(f"cost.{model}.{key}: {c.get(key)!r}, expected a number")
        for key in c:
            if key not in COST_REQUIRED and key not in COST_OPTIONAL:
                problems.append(
                    f"cost.{model}.{key}: unknown; expected one of {', '.join(COST_REQUIRED + COST_OPTIONAL)}"
                )
            elif key in COST_OPTIONAL and not _is_number(c[key]):
                problems.append(f"cost.{model}.{key}: {c[key]!r}, expected a number")
    teacher = cost.get("teacher")
    if not isinstance(teacher, Mapping) or not all(_is_number(teacher.get(k)) for k in COST_REQUIRED):
        return
    try:
        expected = with_speedups({m: c for m, c in cost.items() if isinstance(c, Mapping)})
    except (KeyError, TypeError, ValueError):
        return  # a missing or non-numeric field, reported above
    for model, c in expected.items():
        for key in ("speedup_latency", "speedup_throughput"):
            if _is_number(cost[model].get(key)) and not _close(cost[model][key], c[key]):
                problems.append(f"cost.{model}.{key}: {cost[model][key]!r}, expected {c[key]!r} (with_speedups)")


def _same_interval(given: Any, expected: list[float] | None) -> bool:
    if expected is None:
        return given is None
    if not isinstance(given, Sequence) or len(given) != 2:
        return False
    return all(_is_number(g) and _close(g, e) for g, e in zip(given, expected))


def _close(a: Any, b: float) -> bool:
    a = float(a)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _plain(value: Any) -> float | int:
    """A Python int or float (numpy scalars become plain numbers, so json writes them)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def _is_number(value: object) -> bool:
    # numbers.Real covers numpy numbers too (numpy's bool is not one); bool is an int subclass but is not a
    # measurement to average.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
