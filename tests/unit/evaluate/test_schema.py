"""metrics.json's schema (docs/metrics.md): building it, reading it back through the accessors, refusing departures."""

from __future__ import annotations

import copy
import json
import statistics

import numpy as np
import pytest

from kdkit.evaluate.schema import (
    assemble,
    check_metrics,
    mean_of,
    model_entry,
    paired_gain,
    per_seed_of,
    spread,
    std_of,
    with_speedups,
)


def quality(accuracy: float, ece: float = 0.05) -> dict:
    return {"accuracy": accuracy, "f1_macro": accuracy - 0.02, "ece": ece, "phase": "not a metric"}


def cost(latency_ms: float, throughput: float, params: int) -> dict:
    return {"params": params, "size_mb": params * 4 / 1e6, "latency_ms": latency_ms, "throughput": throughput}


COSTS = {
    "teacher": {**cost(4.0, 250.0, 1_000_000), "members": 2},
    "baseline_student": cost(0.5, 2000.0, 50_000),
    "student": cost(0.5, 2000.0, 50_000),
}
BEST = {"phase": "student-s1", "seed": 1, "by": "val/accuracy", "value": 0.97}


def three_seeds(**extras) -> dict:
    students = [quality(0.90), quality(0.80), quality(0.85)]
    baselines = [quality(0.88), quality(0.79), quality(0.80)]
    return assemble(
        "classification", [0, 1, 2], quality(0.95), students, baselines, COSTS, ["accuracy", "ece"], BEST, **extras
    )


def test_one_seed_round_trip_gives_plain_numbers():
    m = assemble(
        "classification",
        [7],
        quality(0.95),
        [quality(0.90)],
        [quality(0.88)],
        COSTS,
        None,
        {**BEST, "seed": 7, "phase": "student-s7"},
        data={"rows": 10},
        robustness=None,
    )
    m = json.loads(json.dumps(m))  # what metrics.json holds
    check_metrics(m)
    assert m["schema"] == 1 and m["task"] == "classification" and m["seeds"] == [7]
    assert m["student"] == {"accuracy": 0.90, "f1_macro": pytest.approx(0.88), "ece": 0.05}  # "phase" is no metric
    assert m["teacher"]["accuracy"] == 0.95
    assert m["gain"]["accuracy"] == {"mean": pytest.approx(0.02), "std": 0.0, "n": 1, "ci95": None}  # no spread
    assert set(m["gain"]) == {"accuracy", "f1_macro", "ece"}  # gain_keys None: every shared metric
    assert m["data"] == {"rows": 10} and "robustness" not in m  # None extras are left out
    value = m["student"]["accuracy"]
    assert mean_of(value) == 0.90 and std_of(value) == 0.0 and per_seed_of(value) == [0.90]


def test_three_seed_round_trip_gives_mean_std_and_per_seed_in_seed_order():
    m = json.loads(json.dumps(three_seeds(teacher_cache={"bytes": 10})))
    check_metrics(m)
    accuracy = m["student"]["accuracy"]
    assert set(accuracy) == {"mean", "std", "per_seed"}
    assert per_seed_of(accuracy) == [0.90, 0.80, 0.85]
    assert mean_of(accuracy) == pytest.approx(0.85)
    assert std_of(accuracy) == pytest.approx(statistics.pstdev([0.90, 0.80, 0.85]))  # population, ddof=0
    assert m["teacher"]["accuracy"] == 0.95  # one model: plain numbers
    differences = [0.02, 0.01, 0.05]
    assert m["gain"]["accuracy"]["mean"] == pytest.approx(statistics.mean(differences))
    assert m["gain"]["accuracy"]["std"] == pytest.approx(statistics.pstdev(differences))
    assert m["gain"]["accuracy"]["n"] == 3
    # 95% interval: mean ± t·s/√3, s the sample std; with 2 degrees of freedom t(0.975) has the closed form
    # (2p − 1)/√(2p(1 − p)) = 0.95/√0.04875 = 4.3027.
    half = 0.95 / (2 * 0.975 * 0.025) ** 0.5 * statistics.stdev(differences) / 3**0.5
    mean = statistics.mean(differences)
    assert m["gain"]["accuracy"]["ci95"] == [pytest.approx(mean - half), pytest.approx(mean + half)]
    assert m["gain"]["accuracy"]["ci95"][0] < 0 < m["gain"]["accuracy"]["ci95"][1]  # +2.7 pts that 3 seeds can't tell
    assert set(m["gain"]) == {"accuracy", "ece"}
    assert m["best_seed"] == BEST and m["teacher_cache"] == {"bytes": 10}
    c = m["cost"]
    assert c["teacher"]["speedup_latency"] == 1.0 and c["teacher"]["speedup_throughput"] == 1.0
    assert c["student"]["speedup_latency"] == pytest.approx(8.0)  # 4.0 ms / 0.5 ms
    assert c["student"]["speedup_throughput"] == pytest.approx(8.0)  # 2000 / 250 examples/s
    assert c["teacher"]["members"] == 2


def test_without_a_baseline_there_is_no_baseline_entry_and_no_gain():
    costs = {k: v for k, v in COSTS.items() if k != "baseline_student"}
    m = assemble("causal_lm", [0, 1], {"nll": 2.0}, [{"nll": 2.5}, {"nll": 2.7}], None, costs, ["nll"], None)
    check_metrics(m)
    assert "baseline_student" not in m and "gain" not in m and "best_seed" not in m


def test_a_teacher_refit_per_seed_is_summarised_like_a_student():
    costs = {k: v for k, v in COSTS.items() if k != "baseline_student"}
    m = assemble("tabular", [0, 1], [quality(0.9), quality(0.8)], [quality(0.7), quality(0.6)], [], costs, None, None)
    check_metrics(m)
    assert per_seed_of(m["teacher"]["accuracy"]) == [0.9, 0.8]


def test_model_entry_keeps_numbers_present_in_every_seed_and_plain_python_types():
    entry = model_entry([{"a": np.float32(0.5), "n": np.int64(3), "flag": True, "x": 1.0}, {"a": 0.7, "n": 3}])
    assert set(entry) == {"a", "n"}  # a bool is no measurement; "x" is missing from one seed
    one = model_entry([{"a": np.float32(0.5), "n": np.int64(3)}])
    assert type(one["a"]) is float and type(one["n"]) is int
    assert json.dumps(one)
    nan = model_entry([{"a": 0.5}, {"a": float("nan")}])["a"]
    assert np.isnan(nan["mean"]) and np.isnan(nan["std"])


def test_spread_is_population_std():
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "per_seed": [1.0, 3.0]}


def test_paired_gain_refuses_unpaired_seeds_and_missing_metrics():
    with pytest.raises(ValueError, match="pairs seeds"):
        paired_gain([quality(0.9)] * 3, [quality(0.8)] * 2)
    with pytest.raises(ValueError, match="'kl'"):
        paired_gain([quality(0.9)], [quality(0.8)], ["kl"])


def test_assemble_refuses_a_per_seed_list_of_the_wrong_length_and_clashing_extras():
    with pytest.raises(ValueError, match="student_per_seed has 2 entries"):
        assemble("classification", [0, 1, 2], quality(0.9), [quality(0.8)] * 2, None, COSTS, None, None)
    with pytest.raises(ValueError, match="overwrite"):
        assemble("classification", [0], quality(0.9), [quality(0.8)], None, COSTS, None, None, gain={})


def test_with_speedups_divides_by_the_teacher():
    out = with_speedups({"teacher": cost(3.0, 100.0, 10), "student": cost(1.5, 400.0, 1)})
    assert out["student"]["speedup_latency"] == 2.0 and out["student"]["speedup_throughput"] == 4.0
    assert out["teacher"]["speedup_latency"] == 1.0 and out["teacher"]["speedup_throughput"] == 1.0
    with pytest.raises(ValueError, match="teacher"):
        with_speedups({"student": cost(1.5, 400.0, 1)})


def broken(change) -> str:
    """check_metrics' message for a valid three-seed dict changed by `change`."""
    m = copy.deepcopy(three_seeds())
    change(m)
    with pytest.raises(ValueError) as info:
        check_metrics(m)
    return str(info.value)


def test_check_metrics_refuses_a_dict_without_cost():
    assert "cost: missing" in broken(lambda m: m.pop("cost"))


def test_check_metrics_refuses_a_per_seed_list_of_the_wrong_length():
    def drop_a_seed(m):
        m["student"]["accuracy"]["per_seed"] = [0.9, 0.8]

    assert "student.accuracy.per_seed: 2 values, expected 3" in broken(drop_a_seed)


def test_check_metrics_refuses_other_departures():
    def sample_std(m):
        m["student"]["ece"]["std"] = 1.0

    def plain_in_three_seeds(m):
        m["student"]["accuracy"] = 0.85

    def wrong_speedup(m):
        m["cost"]["student"]["speedup_latency"] = 2.0

    def unknown_cost(m):
        m["cost"]["student"]["speedup"] = 2.0

    def gain_n(m):
        m["gain"]["accuracy"]["n"] = 2

    def no_baseline(m):
        del m["baseline_student"], m["cost"]["baseline_student"]

    def unpaired_gain(m):
        m["gain"]["accuracy"]["mean"] = 0.05

    def narrow_interval(m):
        m["gain"]["accuracy"]["ci95"] = [0.02, 0.03]

    def bad_best(m):
        m["best_seed"]["seed"] = 9

    assert "student.ece.std" in broken(sample_std)
    assert "plain number, but the run has 3 seeds" in broken(plain_in_three_seeds)
    assert "cost.student.speedup_latency: 2.0, expected 8.0" in broken(wrong_speedup)
    assert "cost.student.speedup: unknown" in broken(unknown_cost)
    assert "gain.accuracy.n: 2, expected 3" in broken(gain_n)
    assert "gain: present without a baseline_student" in broken(no_baseline)
    assert "gain.accuracy.mean: 0.05, but the paired per-seed differences give" in broken(unpaired_gain)
    assert "gain.accuracy.ci95: [0.02, 0.03], but the paired per-seed differences give" in broken(narrow_interval)
    readable = copy.deepcopy(three_seeds())
    del readable["gain"]["accuracy"]["ci95"]  # a run written before the interval existed still reads
    check_metrics(readable)  # no error
    assert "best_seed.seed: 9" in broken(bad_best)
    assert "schema: 2" in broken(lambda m: m.update(schema=2))
    assert "cost.baseline_student: missing" in broken(lambda m: m["cost"].pop("baseline_student"))


def test_the_examples_in_docs_metrics_md_follow_the_schema():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text(encoding="utf-8")
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)]
    tasks = [e["task"] for e in examples if "schema" in e]
    assert tasks == ["classification", "causal_lm", "tabular"]
    for example in examples:
        if "schema" in example:
            check_metrics(example)
