"""Assisted generation with a draft gives the target's greedy output, token for token, on tiny random Llamas."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdkit.generation.assisted import AssistedMismatch, assisted_generate, check_pair, compare_assisted

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
