"""Assisted generation with a draft gives the target's greedy output, token for token, on tiny random Llamas; the
drafted and accepted tokens it reports equal a reference simulation; speculative sampling accepts all of q = p."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdkit.generation.assisted import (
    AssistedMismatch,
    assisted_generate,
    check_pair,
    compare_assisted,
    sampled_acceptance,
)

PROMPTS = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8, 9]]
NEW = 10


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32, vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=None,  # never stop early: every run makes NEW tokens
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def manual_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The reference without generate(): argmax of a full forward over the growing sequence."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return tiny_llama(0)


@pytest.fixture(scope="module")
def greedy(target) -> list[list[int]]:
    """The target's greedy continuation of each prompt, computed without generate()."""
    return [manual_greedy(target, p, NEW) for p in PROMPTS]


def test_assisted_output_equals_the_targets_greedy_output(target, greedy):
    draft = tiny_llama(1, layers=1)  # another random model: most of its tokens are rejected
    same = copy.deepcopy(target)  # the target itself as draft: every token accepted
    for prompt, expected in zip(PROMPTS, greedy):
        ids = torch.tensor([prompt])
        assert assisted_generate(target, None, ids, NEW) == expected
        for k in (1, 4):
            assert assisted_generate(target, draft, ids, NEW, num_assistant_tokens=k) == expected, (prompt, k)
            assert assisted_generate(target, same, ids, NEW, num_assistant_tokens=k) == expected, (prompt, k)


def test_the_drafts_generation_config_is_left_as_it_was(target):
    draft = tiny_llama(1, layers=1)
    before = draft.generation_config.to_dict()
    assisted_generate(target, draft, torch.tensor([PROMPTS[0]]), NEW, num_assistant_tokens=3)
    assert draft.generation_config.to_dict() == before


def test_compare_counts_target_calls_and_checks_every_output(target):
    same = copy.deepcopy(target)
    k = 3
    result = compare_assisted(target, same, PROMPTS[:2], max_new_tokens=NEW, k=k, repeats=2)
    assert result.identical and result.mismatches == []
    assert result.new_tokens == 2 * 2 * NEW
    # Everything accepted: each call yields k + 1 tokens, the last call only what is left: ceil(10 / 4) = 3 calls.
    assert result.tokens_per_target_call == pytest.approx(NEW / 3)
    assert result.target_tokens_per_s > 0 and result.assisted_tokens_per_s > 0
    assert result.speedup == pytest.approx(result.assisted_tokens_per_s / result.target_tokens_per_s)
    rejected = compare_assisted(target, tiny_llama(1, layers=1), PROMPTS[:2], max_new_tokens=NEW, k=k, repeats=1)
    assert rejected.identical and 1.0 <= rejected.tokens_per_target_call < NEW / 3


def test_compare_raises_or_flags_a_mismatch(target, monkeypatch):
    import kdkit.generation.assisted as assisted

    real = assisted.assisted_generate

    def broken(t, d, ids, n, k, eos=None):
        out = real(t, d, ids, n, k, eos)
        return out if d is None else out[:-1] + [(out[-1] + 1) % 64]

    monkeypatch.setattr(assisted, "assisted_generate", broken)
    same = copy.deepcopy(target)
    with pytest.raises(AssistedMismatch, match=r"^prompts\[0\] \(repeat 0\): assisted output differs .* new token 9"):
        compare_assisted(target, same, PROMPTS[:2], max_new_tokens=NEW, k=2, repeats=1)
    flagged = compare_assisted(target, same, PROMPTS[:2], max_new_tokens=NEW, k=2, repeats=1, strict=False)
    assert flagged.mismatches == [0, 1] and not flagged.identical


def test_bad_pairs_and_arguments_are_one_line_errors(target):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match=r"^draft vocab_size: 48; expected the target's 64 \(the same tokenizer\)$"):
        assisted_generate(target, tiny_llama(1, layers=1, vocab=48), ids, NEW, num_assistant_tokens=2)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^num_assistant_tokens: {k!r}; expected an integer ≥ 1"):
            assisted_generate(target, tiny_llama(1, layers=1), ids, NEW, num_assistant_tokens=k)
    with pytest.raises(ValueError, match=r"^num_assistant_tokens: 0; expected an integer ≥ 1"):
        compare_assisted(target, copy.deepcopy(target), PROMPTS, NEW, k=0)
    with pytest.raises(ValueError, match=r"^draft parameters: [\d,]+; expected at most the target's [\d,]+$"):
        check_pair(target, tiny_llama(1, layers=4), 2)
    with pytest.raises(ValueError, match=r"^input_ids: shape \(2, 3\); expected \(1, T\)"):
        assisted_generate(target, None, torch.tensor([PROMPTS[0]] * 2), NEW)
    with pytest.raises(ValueError, match=r"^max_new_tokens: 0; expected an integer ≥ 1"):
        assisted_generate(target, None, ids, 0)
    with pytest.raises(ValueError, match=r"^repeats: 0; expected an integer ≥ 1"):
        compare_assisted(target, copy.deepcopy(target), PROMPTS, NEW, k=2, repeats=0)


def reference_counts(target, draft, prompt: list[int], n: int, k: int) -> dict[str, int]:
    """Greedy speculative decoding simulated without generate(): each round the draft proposes min(k, left − 1)
    tokens (transformers leaves room for the target's own token), the target keeps the common prefix with its own
    greedy continuation and adds its next token."""
    seq, counts = list(prompt), {"calls": 0, "drafted": 0, "verified": 0, "accepted": 0}
    while len(seq) - len(prompt) < n:
        c = min(k, n - (len(seq) - len(prompt)) - 1)
        guess = manual_greedy(draft, seq, c) if c else []
        truth = manual_greedy(target, seq, c + 1)
        a = next((j for j, (g, t) in enumerate(zip(guess, truth)) if g != t), c)
        counts["calls"] += 1
        counts["drafted"] += c
        counts["verified"] += min(a + 1, c)
        counts["accepted"] += a
        seq += truth[: a + 1]
    return counts


def calls_if_all_accepted(n: int, k: int) -> int:
    """Every draft token accepted: each call yields k + 1 tokens, the last one what is left: ceil(n / (k + 1))."""
    return -(-n // (k + 1))


def test_compare_measures_acceptance_of_a_copy_of_the_target(target, greedy):
    k, prompts, repeats = 3, PROMPTS[:2], 2
    c = compare_assisted(target, copy.deepcopy(target), prompts, max_new_tokens=NEW, k=k, repeats=repeats)
    runs = len(prompts) * repeats
    calls = calls_if_all_accepted(NEW, k)  # 3: rounds of 3 + 1, 3 + 1, and 1 + 1 tokens
    assert c.target_calls == runs * calls
    assert c.drafted_tokens == c.verified_tokens == c.accepted_tokens == runs * (NEW - calls)  # 2·2·7 = 28
    assert c.acceptance == 1.0 and c.verified_acceptance == 1.0
    assert c.tokens_per_target_call == pytest.approx(NEW / calls)  # 10 / 3, not k + 1 = 4: the length limit
    assert c.accepted_tokens + c.target_calls == c.new_tokens
    assert c.target_outputs == greedy[:2]


@pytest.mark.parametrize("k", [1, 3])
def test_compare_counts_equal_a_reference_simulation(target, k):
    draft = tiny_llama(1, layers=1)
    calls = [0]
    hook = draft.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        c = compare_assisted(target, draft, PROMPTS, max_new_tokens=NEW, k=k, repeats=1)
    finally:
        hook.remove()
    refs = [reference_counts(target, draft, p, NEW, k) for p in PROMPTS]
    for key in ("calls", "drafted", "verified", "accepted"):
        want = sum(r[key] for r in refs)
        got = getattr(c, "target_calls" if key == "calls" else f"{key}_tokens")
        assert got == want, (key, got, want)
    assert 0 < c.drafted_tokens and c.accepted_tokens <= c.verified_tokens <= c.drafted_tokens
    assert c.acceptance == pytest.approx(c.accepted_tokens / c.drafted_tokens) and c.acceptance < 1
    assert c.accepted_tokens + c.target_calls == c.new_tokens
    # The draft runs one forward call per proposed token (the timed runs plus the warm-up on PROMPTS[0]).
    assert calls[0] == c.drafted_tokens + refs[0]["drafted"]
    assert "generate" not in vars(draft)  # the recording wrapper is gone


def test_an_accepted_eos_drops_the_targets_token(target, greedy):
    """k = 3 with a copy of the target: round 1 drafts new tokens 0-2 and the target adds 3; round 2 drafts 4-6.
    eos = new token 5: the draft stops there, the target accepts both and transformers drops its own next token.
    eos = new token 3 (the target's own token of round 1): nothing dropped."""
    out = greedy[0]
    assert out[5] not in out[:5] and out[3] not in out[:3]  # the chosen eos ends the output where meant
    same = copy.deepcopy(target)
    c = compare_assisted(target, same, PROMPTS[:1], max_new_tokens=NEW, k=3, repeats=1, eos_token_id=out[5])
    assert c.target_outputs == [out[:6]] and c.identical
    assert (c.target_calls, c.drafted_tokens, c.accepted_tokens) == (2, 5, 5)
    assert c.new_tokens == c.accepted_tokens + c.target_calls - 1
    c = compare_assisted(target, same, PROMPTS[:1], max_new_tokens=NEW, k=3, repeats=1, eos_token_id=out[3])
    assert c.target_outputs == [out[:4]]
    assert (c.target_calls, c.drafted_tokens, c.accepted_tokens) == (1, 3, 3)
    assert c.new_tokens == c.accepted_tokens + c.target_calls


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_accepts_every_token_of_a_copy_of_the_target(target, temperature):
    """q = p: min(1, p / q) = 1. At 0.5 this fails if the draft's temperature is applied twice (transformers 5.x
    does that with generate(temperature=...); assisted_generate passes it as a logits processor)."""
    k = 3
    s = sampled_acceptance(target, copy.deepcopy(target), PROMPTS, max_new_tokens=NEW, k=k, temperature=temperature)
    calls = calls_if_all_accepted(NEW, k)
    assert (s.k, s.temperature, s.new_tokens) == (k, temperature, len(PROMPTS) * NEW)
    assert s.target_calls == len(PROMPTS) * calls
    assert s.drafted_tokens == s.verified_tokens == s.accepted_tokens == len(PROMPTS) * (NEW - calls)
    assert s.acceptance == 1.0 and s.tokens_per_target_call == pytest.approx(NEW / calls)


def test_sampling_with_another_draft_is_repeatable_and_leaves_the_rng_alone(target):
    draft = tiny_llama(1, layers=1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(8)  # sharper than the target's near-uniform softmax: a real share is rejected
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    s = sampled_acceptance(target, draft, PROMPTS, max_new_tokens=NEW, k=3, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is where it was
    assert 0 <= s.acceptance < 1 and s.accepted_tokens <= s.verified_tokens <= s.drafted_tokens
    assert s.acceptance == pytest.approx(s.accepted_tokens / s.drafted_tokens)
    assert s.accepted_tokens + s.target_calls == s.new_tokens == len(PROMPTS) * NEW
    assert sampled_acceptance(target, draft, PROMPTS, max_new_tokens=NEW, k=3, seed=7) == s
    assert "generate" not in vars(draft)


def test_sampling_arguments_are_one_line_errors(target):
    ids, same = torch.tensor([PROMPTS[0]]), copy.deepcopy(target)
    for t in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=rf"^temperature: {re.escape(repr(t))}; expected a finite number > 0"):
            sampled_acceptance(target, same, PROMPTS, NEW, k=2, temperature=t)
        with pytest.raises(ValueError, match=r"^temperature: .*; expected a finite number > 0"):
            assisted_generate(target, same, ids, NEW, do_sample=True, temperature=t)
    with pytest.raises(ValueError, match=r"^seed: 1\.5; expected an integer$"):
        sampled_acceptance(target, same, PROMPTS, NEW, k=2, seed=1.5)
    with pytest.raises(ValueError, match=r"^num_assistant_tokens: 0; expected an integer ≥ 1"):
        sampled_acceptance(target, same, PROMPTS, NEW, k=0)
    with pytest.raises(ValueError, match=r"^prompts: empty, or an empty prompt"):
        sampled_acceptance(target, same, [[]], NEW, k=2)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_acceptances_follow_min_p_q_at_each_verified_position(target, temperature):
    """Speculative sampling accepts the draft's token at a position with probability α = Σ_v min(p(v), q(v)) at the
    temperature (Leviathan et al. 2023, Corollary 3.6), given the prefix. So over the positions the target verified
    (each round's draft tokens up to the first rejected one), accepted ≈ Σ α, within a few √Σ α(1 − α). With the
    draft's temperature applied twice (transformers 5.x with generate(temperature=0.5)) this is ~9 σ off."""
    from kdkit.generation.assisted import _recording

    draft = tiny_llama(1, layers=1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(8)  # sharper than the target: α well below 1
    g = torch.Generator().manual_seed(5)
    accepted, mean, var = 0, 0.0, 0.0
    for i in range(40):
        prompt = torch.randint(2, 64, (3,), generator=g).tolist()
        torch.manual_seed(i)
        with _recording(target, draft) as rounds:
            out = assisted_generate(
                target, draft, torch.tensor([prompt]), 12, 3, do_sample=True, temperature=temperature
            )
        seq = prompt + out
        with torch.no_grad():
            p = (target(torch.tensor([seq])).logits[0] / temperature).softmax(-1)
            q = (draft(torch.tensor([seq])).logits[0] / temperature).softmax(-1)
        alpha = torch.minimum(p, q).sum(-1).tolist()  # alpha[j]: for the token at position j + 1
        for start, tokens in rounds.drafts:
            proposed = tokens.tolist()
            n = next((j for j, (a, b) in enumerate(zip(proposed, seq[start:])) if a != b), len(proposed))
            verified = alpha[start - 1 : start - 1 + min(n + 1, len(proposed))]
            accepted += n
            mean += sum(verified)
            var += sum(a * (1 - a) for a in verified)
    assert var > 25  # enough rejections for the test to say something
    assert abs(accepted - mean) < 4 * var**0.5, (accepted, mean, var**0.5)
