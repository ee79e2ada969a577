"""Generation for sequence-level and on-policy KD, on tiny random-init Llama and GPT-2 models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kdkit.errors import DataError
from kdkit.generation import (
    GenerationSettings,
    OnPolicy,
    generate,
    read_generations,
    sequence_kd_examples,
    write_generations,
)
from kdkit.types import Batch

V, PAD = 64, 0
GREEDY = GenerationSettings(sampling_temperature=1.0, top_p=1.0, max_new_tokens=6, do_sample=False)
SAMPLE = GenerationSettings(sampling_temperature=1.5, top_p=0.95, max_new_tokens=6, do_sample=True)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


PROMPTS = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8, 9], [12, 13]]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sampling_temperature": 0.0}, "sampling_temperature"),
        ({"sampling_temperature": -1.0}, "sampling_temperature"),
        ({"sampling_temperature": float("nan")}, "sampling_temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ],
)
def test_settings_out_of_range_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        GenerationSettings(**kwargs)


def test_settings_in_range_and_context_room():
    GenerationSettings(sampling_temperature=0.0, do_sample=False)  # temperature does not matter when greedy
    s = GenerationSettings(max_new_tokens=8)
    s.check_fits(24, 32)
    with pytest.raises(ValueError, match=r"^max_new_tokens: 8; a prompt of 25 tokens leaves room for at most 7"):
        s.check_fits(25, 32)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_left_padded_batches_equal_one_by_one_greedy(make):
    model = make()
    batched = generate(model, PROMPTS, GREEDY, pad_id=PAD, eos_id=None, batch_size=4)
    single = [generate(model, [p], GREEDY, pad_id=PAD, eos_id=None, batch_size=1)[0] for p in PROMPTS]
    # Reference without generate(): argmax of a full forward over the growing sequence.
    with torch.no_grad():
        manual = []
        for p in PROMPTS:
            seq = torch.tensor([p])
            for _ in range(GREEDY.max_new_tokens):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            manual.append(seq[0, len(p) :].tolist())
    assert batched == single == manual
    assert all(len(c) == GREEDY.max_new_tokens for c in batched)


def test_completions_stop_at_eos():
    model = tiny_llama()
    free = generate(model, PROMPTS, GREEDY, pad_id=PAD, eos_id=None)
    # Declare the token each prompt's free run emits third as eos: each completion must end at its first occurrence.
    eos = free[0][2]
    stopped = generate(model, PROMPTS, GREEDY, pad_id=PAD, eos_id=eos)
    for full, cut in zip(free, stopped):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert cut == expected
    assert stopped[0] == free[0][: free[0].index(eos) + 1] and stopped[0][-1] == eos


def test_sampling_is_seeded_restores_mode_and_leaves_global_rng():
    model = tiny_llama().train()
    torch.manual_seed(123)
    a = generate(model, PROMPTS, SAMPLE, pad_id=PAD, eos_id=None, seed=7, batch_size=2)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    b = generate(model, PROMPTS, SAMPLE, pad_id=PAD, eos_id=None, seed=7, batch_size=2)
    c = generate(model, PROMPTS, SAMPLE, pad_id=PAD, eos_id=None, seed=8, batch_size=2)
    assert a == b and a != c
    assert torch.equal(after, expected_after)
    assert model.training


def test_bad_prompts_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="^prompts: empty"):
        generate(model, [], GREEDY, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: empty"):
        generate(model, [[3], []], GREEDY, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match=r"^prompts\[0\]: 40 tokens, longer than the model's context of 32"):
        generate(model, [[3] * 40], GREEDY, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match="^max_new_tokens: 6; a prompt of 30 tokens leaves room for at most 2"):
        generate(model, [[3] * 30], GREEDY, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match="context of 8"):
        generate(model, [[3] * 10], GREEDY, pad_id=PAD, eos_id=2, context_length=8)


def test_sequence_kd_examples_mask_exactly_the_prompts():
    prompts, completions = [[5, 6, 7], [8], [9, 10]], [[11, 12, 2], [13], []]
    examples = sequence_kd_examples(prompts, completions, PAD, block=16)
    assert len(examples) == 2  # an empty completion predicts nothing
    assert examples[0]["input_ids"].tolist() == [5, 6, 7, 11, 12, 2]
    assert examples[0]["labels"].tolist() == [-100, -100, -100, 11, 12, 2]
    assert examples[1]["input_ids"].tolist() == [8, 13] and examples[1]["labels"].tolist() == [-100, 13]
    assert all(e["input_ids"].dtype == e["labels"].dtype == torch.long for e in examples)
    # Too long: the prompt loses its start first, then the completion its end.
    (cut,) = sequence_kd_examples([[1, 2, 3, 4, 5]], [[6, 7]], PAD, block=4)
    assert cut["input_ids"].tolist() == [4, 5, 6, 7] and cut["labels"].tolist() == [-100, -100, 6, 7]
    (cut,) = sequence_kd_examples([[1, 2]], [[6, 7, 8, 9, 10]], PAD, block=4)
    assert cut["input_ids"].tolist() == [2, 6, 7, 8] and cut["labels"].tolist() == [-100, 6, 7, 8]
    with pytest.raises(ValueError, match="^completions: 1 for 2 prompts"):
        sequence_kd_examples([[1], [2]], [[3]], PAD, block=4)


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_generations_jsonl_round_trip(tmp_path):
    path = tmp_path / "gen" / "teacher.jsonl"
    write_generations(path, [[0, 1], [2]], [[3, 4, 5], [6]], CharTokenizer())
    records = read_generations(path)
    assert records == [
        {"prompt_ids": [0, 1], "completion_ids": [3, 4, 5], "prompt": "ab", "completion": "def"},
        {"prompt_ids": [2], "completion_ids": [6], "prompt": "c", "completion": "g"},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["teacher.jsonl"]  # no temp file left
    path.write_text(path.read_text() + json.dumps({"prompt_ids": [1], "completion_ids": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 3 is not a record"):
        read_generations(path)
    with pytest.raises(DataError, match="not found"):
        read_generations(tmp_path / "missing.jsonl")


def lm_batch(rows: list[list[int]], index: list[int]) -> Batch:
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width), PAD)
    for i, r in enumerate(rows):
        inputs[i, : len(r)] = torch.tensor(r)
    mask = (inputs != PAD).long()
    return Batch(inputs, inputs.masked_fill(mask == 0, -100), torch.tensor(index), attention_mask=mask)


ROWS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16]]


def test_on_policy_lambda_zero_never_changes_a_batch():
    student = tiny_llama()
    op = OnPolicy(0.0, GREEDY, prompt_tokens=3, pad_id=PAD, eos_id=2)
    for i in range(20):
        batch = lm_batch(ROWS, [i, i + 1, i + 2])
        assert op(batch, student) is batch and op(batch, student, step=i) is batch


def test_on_policy_lambda_one_replaces_with_student_continuations():
    student = tiny_llama().train()
    free = generate(student, [r[:3] for r in ROWS], GREEDY, pad_id=PAD, eos_id=None)
    eos = free[1][1]  # row 1 stops after two new tokens (or earlier), so its tail is padding
    op = OnPolicy(1.0, GREEDY, prompt_tokens=3, pad_id=PAD, eos_id=eos, seed=0)
    batch = lm_batch(ROWS, [0, 1, 2])
    out = op(batch, student, step=5)
    assert student.training  # train mode restored
    expected = generate(student, [r[:3] for r in ROWS], GREEDY, pad_id=PAD, eos_id=eos)
    assert torch.equal(out.index, batch.index)
    for row, (src, completion) in enumerate(zip(ROWS, expected)):
        prompt = src[:3]
        n = len(prompt) + len(completion)
        assert out.inputs[row, :n].tolist() == prompt + completion
        assert out.labels[row].tolist() == [-100] * len(prompt) + completion + [-100] * (out.inputs.shape[1] - n)
        assert out.attention_mask[row].tolist() == [1] * n + [0] * (out.inputs.shape[1] - n)
        assert (out.inputs[row, n:] == PAD).all()
    assert expected[1][-1] == eos and len(expected[1]) <= 2
    assert out.inputs.shape[1] == max(len(r[:3]) + len(c) for r, c in zip(ROWS, expected))


def test_on_policy_is_deterministic_for_a_seed():
    student = tiny_llama()
    batches = [lm_batch(ROWS, [3 * i, 3 * i + 1, 3 * i + 2]) for i in range(40)]
    half = OnPolicy(0.5, SAMPLE, prompt_tokens=2, pad_id=PAD, eos_id=None, seed=3)
    again = OnPolicy(0.5, SAMPLE, prompt_tokens=2, pad_id=PAD, eos_id=None, seed=3)
    other = OnPolicy(0.5, SAMPLE, prompt_tokens=2, pad_id=PAD, eos_id=None, seed=4)
    by_index = [half.chosen(b) for b in batches]
    assert by_index == [again.chosen(b) for b in batches]
    assert by_index != [other.chosen(b) for b in batches]
    assert 10 <= sum(by_index) <= 30
    by_step = [half.chosen(batches[0], step=s) for s in range(40)]
    assert by_step == [again.chosen(batches[0], step=s) for s in range(40)] and 10 <= sum(by_step) <= 30
    step = by_step.index(True)
    torch.manual_seed(0)
    a = half(batches[0], student, step=step)
    torch.manual_seed(99)  # the global RNG does not decide what is sampled
    b = again(batches[0], student, step=step)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    # Rows shorter than prompt_tokens use what they have: row 2 has 2 real tokens and prompt_tokens is 2 here.
    assert a.labels[2, :2].tolist() == [-100, -100] and a.inputs[2, :2].tolist() == [15, 16]


def test_on_policy_bad_arguments():
    with pytest.raises(ValueError, match="^fraction: 1.5"):
        OnPolicy(1.5, GREEDY, prompt_tokens=2, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match="^prompt_tokens: 0"):
        OnPolicy(0.5, GREEDY, prompt_tokens=0, pad_id=PAD, eos_id=2)
    with pytest.raises(ValueError, match="^max_new_tokens: 6; a prompt of 30 tokens"):
        OnPolicy(0.5, GREEDY, prompt_tokens=30, pad_id=PAD, eos_id=2, context_length=32)


def test_sampling_uses_the_whole_distribution_no_hidden_top_k():
    # transformers fills an unset top_k with 50; at a near-uniform temperature, 400 draws over 64 tokens must reach
    # more than 50 distinct tokens, which they cannot under a top-50 filter.
    flat = GenerationSettings(sampling_temperature=1000.0, top_p=1.0, max_new_tokens=1, do_sample=True)
    draws = generate(tiny_llama(), [[5, 6]] * 400, flat, pad_id=PAD, eos_id=None, seed=0, batch_size=400)
    assert len({d[0] for d in draws}) > 50
