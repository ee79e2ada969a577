"""measure_cost: one measurement for every model. Timings come from a fake clock that the stub forward advances, so
the figures are exact and no assertion depends on this machine's speed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.evaluate import cost as cost_module
from kdkit.evaluate import latency
from kdkit.evaluate.cost import measure_cost, with_speedups


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(latency, "time", fake)
    return fake


def stub(clock: FakeClock, fixed_s: float, per_example_s: float):
    """A forward that takes fixed_s + per_example_s · batch size seconds on the fake clock, and counts its calls."""
    calls = []

    def forward(x):
        calls.append(len(x))
        clock.now += fixed_s + per_example_s * len(x)
        return torch.zeros(len(x), 3)

    return forward, calls


def test_measure_cost_times_batch_one_and_the_batch_with_the_given_calls(clock):
    forward, calls = stub(clock, fixed_s=0.001, per_example_s=0.0001)
    model = torch.nn.Linear(10, 5)
    c = measure_cost(forward, model, torch.zeros(1, 10), torch.zeros(32, 10), repeats=4, warmup=2, batch_repeats=3)
    assert calls == [1] * 6 + [32] * 4  # warmup + repeats at batch 1, then batch_warmup (1) + batch_repeats
    assert c == {
        "params": 55,
        "size_mb": pytest.approx(220 / 1e6),
        "latency_ms": pytest.approx(1.1),  # 1 ms + 0.1 ms per example
        "throughput": pytest.approx(32 / 0.0042),  # examples per second at batch 32
        "batch_size": 32,
        "members": 1,
    }


def test_tokens_per_s_for_language_models(clock):
    forward, _ = stub(clock, fixed_s=0.0, per_example_s=0.002)
    ids = torch.zeros(8, 16, dtype=torch.long)  # 8 blocks of 16 tokens
    c = measure_cost(forward, torch.nn.Linear(2, 2), ids[:1], ids, repeats=1, warmup=0, tokens_per_example=16)
    assert c["throughput"] == pytest.approx(500.0)  # blocks/s
    assert c["tokens_per_s"] == pytest.approx(500.0 * 16)


def test_an_ensemble_sums_its_members_and_a_model_without_modules_gives_its_footprint(clock):
    forward, _ = stub(clock, fixed_s=0.001, per_example_s=0.0)
    members = [torch.nn.Linear(10, 5), torch.nn.Linear(10, 5)]
    c = measure_cost(forward, members, torch.zeros(1, 10), torch.zeros(4, 10), repeats=1, warmup=0)
    assert c["params"] == 110 and c["members"] == 2
    # A scikit-learn model: numpy inputs, a footprint counted by the task.
    table = np.zeros((4, 3))
    c = measure_cost(forward, {"params": 31, "size_mb": 0.002}, table[:1], table, repeats=1, warmup=0)
    assert c["params"] == 31 and c["size_mb"] == 0.002 and c["batch_size"] == 4 and c["members"] == 1


def test_teacher_and_student_measured_alike_give_speedups_from_their_numbers(clock):
    one, batch = torch.zeros(1, 10), torch.zeros(16, 10)
    slow, _ = stub(clock, fixed_s=0.004, per_example_s=0.001)
    fast, _ = stub(clock, fixed_s=0.001, per_example_s=0.0001)
    costs = {
        "teacher": measure_cost(slow, torch.nn.Linear(10, 5), one, batch, repeats=3, warmup=1),
        "student": measure_cost(fast, torch.nn.Linear(10, 1), one, batch, repeats=3, warmup=1),
    }
    out = with_speedups(costs)
    assert out["teacher"]["speedup_latency"] == 1.0 and out["teacher"]["speedup_throughput"] == 1.0
    assert out["student"]["speedup_latency"] == pytest.approx(5.0 / 1.1)  # batch 1: 5 ms vs 1.1 ms
    assert out["student"]["speedup_throughput"] == pytest.approx(0.020 / 0.0026)  # batch 16: 20 ms vs 2.6 ms
    assert cost_module.with_speedups is with_speedups


def test_real_module_on_the_real_clock_has_every_key():
    model = torch.nn.Linear(8, 3)
    c = measure_cost(model, model, torch.zeros(1, 8), torch.zeros(4, 8), repeats=2, warmup=1)
    assert set(c) == {"params", "size_mb", "latency_ms", "throughput", "batch_size", "members"}
    assert c["latency_ms"] > 0 and c["throughput"] > 0
