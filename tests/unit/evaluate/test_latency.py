"""Cost measurements: counts and bytes exactly; timings only for shape and call counts, never for speed."""

from __future__ import annotations

import torch

from kdkit.evaluate.latency import footprint, latency_ms, throughput
from kdkit.types import ModelOutputs


def test_footprint_of_a_linear_layer():
    result = footprint(torch.nn.Linear(10, 5))
    assert result["params"] == 55  # 10·5 weights + 5 biases
    assert round(result["size_mb"] * 1e6) == 220  # 55 fp32 values


def test_footprint_sums_a_list_and_counts_buffers_in_size_only():
    bn = torch.nn.BatchNorm1d(4)  # 8 parameters; buffers: running mean, running var (fp32) and the int64 counter
    result = footprint([torch.nn.Linear(10, 5), bn])
    assert result["params"] == 55 + 8
    assert round(result["size_mb"] * 1e6) == 220 + 8 * 4 + 8 * 4 + 8


def test_footprint_of_half_precision_halves_the_size():
    assert round(footprint(torch.nn.Linear(10, 5).half())["size_mb"] * 1e6) == 110


def counting_forward():
    calls = []

    def forward(x: torch.Tensor) -> ModelOutputs:
        calls.append(x.shape[0])
        assert torch.is_inference_mode_enabled()
        return ModelOutputs(logits=torch.zeros(x.shape[0], 3))

    return forward, calls


def test_latency_calls_forward_warmup_plus_repeats_times():
    forward, calls = counting_forward()
    ms = latency_ms(forward, torch.zeros(1, 8), repeats=7, warmup=3)
    assert isinstance(ms, float) and ms > 0
    assert calls == [1] * 10


def test_latency_of_a_real_module():
    model = torch.nn.Linear(8, 3)
    assert latency_ms(model, torch.zeros(1, 8), repeats=3, warmup=1) > 0


def test_throughput_counts_samples_per_call():
    forward, calls = counting_forward()
    batch = torch.zeros(16, 8)
    samples_per_second = throughput(forward, batch, repeats=4, warmup=2)
    assert calls == [16] * 6
    assert isinstance(samples_per_second, float) and samples_per_second > 0
