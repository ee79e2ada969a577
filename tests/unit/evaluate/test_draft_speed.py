"""The expected speed-up of speculative decoding from acceptance and measured costs, and the k it chooses."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdkit.evaluate.acceptance import expected_accepted_length
from kdkit.evaluate.draft_speed import (
    DecodeCosts,
    best_k,
    expected_speedup,
    measure_decode_costs,
    speedup_by_k,
    step_seconds,
)


def tiny_llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_speedup_is_leviathans_improvement_factor_when_verifying_costs_one_step():
    # Leviathan et al. 2023, Theorem 3.8: (1 − α^{k+1}) / ((1 − α)(k·c + 1)) with c = t_draft / t_target.
    alpha, c = 0.7, 0.2
    costs = DecodeCosts(target_token_s=0.05, draft_token_s=0.05 * c, verify_s={k: 0.05 for k in range(1, 9)})
    for k in range(1, 9):
        e = (1 - alpha ** (k + 1)) / (1 - alpha)
        assert expected_speedup(e, k, costs) == pytest.approx(e / (k * c + 1), rel=1e-12)
    # A perfect free draft gains k + 1 per call; verification that costs twice a step halves it.
    free = DecodeCosts(0.01, 0.0, {3: 0.01})
    assert expected_speedup(4.0, 3, free) == pytest.approx(4.0)
    assert expected_speedup(4.0, 3, DecodeCosts(0.01, 0.0, {3: 0.02})) == pytest.approx(2.0)


def test_best_k_trades_tokens_per_call_for_draft_steps():
    # Hand-computed: t_target 1, t_draft 0.25, t_verify(k) = 1 + 0.1k; E(k) from α = 0.5.
    costs = DecodeCosts(1.0, 0.25, {k: 1.0 + 0.1 * k for k in range(1, 6)})
    curve = {str(k): (1 - 0.5 ** (k + 1)) / 0.5 for k in range(1, 6)}
    speed = speedup_by_k(curve, costs)
    assert speed[1] == pytest.approx(1.5 / 1.35)
    assert speed[2] == pytest.approx(1.75 / 1.7)
    assert speed[3] == pytest.approx(1.875 / 2.05)
    assert best_k(curve, costs) == (1, pytest.approx(1.5 / 1.35))
    # A cheap draft with high acceptance wants more tokens per call.
    cheap = DecodeCosts(1.0, 0.05, {k: 1.0 for k in range(1, 6)})
    high = {k: (1 - 0.9 ** (k + 1)) / 0.1 for k in range(1, 6)}
    k, s = best_k(high, cheap)
    assert k == 5 and s == pytest.approx(high[5] / 1.25)
    # Ties go to the smaller k; a k without a measured cost is left out; no common k is an error.
    assert best_k({1: 2.0, 2: 2.0}, DecodeCosts(1.0, 0.0, {1: 1.0, 2: 1.0}))[0] == 1
    assert set(speedup_by_k(curve, DecodeCosts(1.0, 0.1, {2: 1.0}))) == {2}
    with pytest.raises(ValueError, match="no k that the costs cover"):
        best_k({9: 2.0}, costs)
    with pytest.raises(ValueError, match="k: 7; costs were measured for k in"):
        expected_speedup(2.0, 7, costs)


def test_the_estimate_matches_the_acceptance_module():
    alpha = torch.full((1, 40), 0.6)
    costs = DecodeCosts(1.0, 0.3, {4: 1.2})
    e = expected_accepted_length(alpha, 4)
    assert expected_speedup(e, 4, costs) == pytest.approx(((1 - 0.6 ** 5) / 0.4) / (4 * 0.3 + 1.2), rel=1e-6)


def test_step_costs_are_measured_with_the_cache_and_leave_it_as_it_was():
    target, draft = tiny_llama(4), tiny_llama(1)
    prompt = list(range(1, 11))
    seconds = step_seconds(target, prompt, 3, repeats=2)
    assert seconds > 0 and math.isfinite(seconds)
    costs = measure_decode_costs(target, draft, prompt, [3, 1, 3], repeats=2)
    assert sorted(costs.verify_s) == [1, 3]
    assert costs.target_token_s > 0 and costs.draft_token_s > 0
    d = costs.as_dict()
    assert set(d) == {"target_token_ms", "draft_token_ms", "draft_cost_ratio", "verify_ms"}
    assert d["verify_ms"].keys() == {"1", "3"}
    # Every timed pass saw the prompt's cache only: the cache is cropped back, so the logits of a pass after the
    # timings equal those of a fresh cache.
    calls = []
    real = target.forward

    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append(None if cache is None else cache.get_seq_length())
        return real(*args, **kwargs)

    target.forward = spy
    try:
        step_seconds(target, prompt, 2, repeats=3)
    finally:
        target.forward = real
    assert calls == [None, 10, 10, 10, 10]
    with pytest.raises(ValueError, match="prompt: empty"):
        step_seconds(target, [], 1)
    with pytest.raises(ValueError, match="ks: \\[0\\]; expected draft token counts"):
        measure_decode_costs(target, draft, prompt, [0])
