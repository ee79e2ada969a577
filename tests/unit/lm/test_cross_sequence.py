"""Sequence-level KD across tokenizers (kdkit.run.cross_sequence): the teacher reads each prompt's text in its
own tokens, its continuation comes back as text, and the student's example is its own tokens of that text, with the
text and offsets every block keeps and its prompt marked as context."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.lm import build_lm_data
from kdkit.run.cross_sequence import completion_text, cross_sequence_examples, teacher_prompts
from kdkit.run.cross_teacher import block_alignment, student_encoding, teacher_encoding


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def world(lm_world):
    corpus, teacher, other = lm_world
    student_tok, teacher_tok = tokenizer(other), tokenizer(teacher)
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True)
    return data, student_tok, teacher_tok


def test_teacher_prompts_are_the_teachers_tokens_of_the_prompt_text(world):
    data, student_tok, teacher_tok = world
    train, p = data.train, 6
    eos = student_tok.eos_token_id
    rows = [i for i in range(len(train)) if eos not in train.ids[i, :p].tolist()][:3]
    with_eos = [i for i in range(len(train)) if eos in train.ids[i, 1:p].tolist()][:1]
    prompts = teacher_prompts(teacher_tok, train, rows + with_eos, p, None)
    for i, ids in zip(rows, prompts):
        text = student_tok.decode(train.ids[i, :p].tolist())  # the text of the first p student tokens
        assert ids == teacher_tok(text, add_special_tokens=False)["input_ids"]
    if with_eos:  # a document boundary inside the prompt: the teacher's own eos stands there
        i, ids = with_eos[0], prompts[-1]
        pieces = student_tok.decode(train.ids[i, :p].tolist()).split(student_tok.eos_token)
        expected = []
        for k, piece in enumerate(pieces):
            expected += ([teacher_tok.eos_token_id] if k else []) + teacher_tok(piece, add_special_tokens=False)[
                "input_ids"]
        assert ids == expected
    assert max(len(x) for x in teacher_prompts(teacher_tok, train, rows, p, 3)) == 3  # cut at the teacher's context


def test_completion_text_keeps_what_the_tokens_write_in_context(world):
    _, _, tok = world
    text = "the king walks into the hall"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for k in range(1, len(ids)):
        prompt, completion = ids[:k], ids[k:]
        written, ended = completion_text(tok, prompt, completion)
        assert tok.decode(prompt) + written == text and not ended
    written, ended = completion_text(tok, ids[:2], ids[2:] + [tok.eos_token_id])
    assert ended and tok.decode(ids[:2]) + written == text  # the eos is not text: it becomes the student's own
    assert completion_text(tok, ids, []) == ("", False)


def test_examples_are_the_students_tokens_of_prompt_and_written_text(world):
    data, student_tok, _ = world
    train, p = data.train, 6
    written = [(" and the lords bow", True), ("", False), (" to be or not to be", False)]
    out = cross_sequence_examples(train, [0, 1, 2], p, written, student_tok, student_tok.eos_token)
    assert len(out) == 2  # nothing written for row 1: no example
    for r, (row, (text, ended)) in enumerate(zip([0, 2], [written[0], written[2]])):
        prompt_text = student_tok.decode(train.ids[row, :p].tolist())
        completion = student_tok(text, add_special_tokens=False)["input_ids"]
        ids = train.ids[row, :p].tolist() + completion + ([student_tok.eos_token_id] if ended else [])
        n = len(ids)
        assert out.ids[r, :n].tolist() == ids and int(out.lengths[r]) == n
        assert (out.ids[r, n:] == train.pad_id).all()
        assert out.texts[r] == prompt_text + text + (student_tok.eos_token if ended else "")
        assert int(out.prompt_lengths[r]) == p
        for token_id, (s, e) in zip(ids, out.offsets[r, :n].tolist()):  # each token's offsets cover its own text
            piece = out.texts[r][s:e]
            assert piece == (student_tok.eos_token if token_id == student_tok.eos_token_id
                             else student_tok.decode([token_id]))
    # Only the completion is predicted: the prompt's labels are ignored.
    batch = out.collate([out[0]])
    assert (batch.labels[0, :p] == -100).all() and (batch.labels[0, p:int(out.lengths[0])] >= 0).all()


def test_a_long_completion_is_cut_at_the_block_and_a_whole_block_prompt_keeps_its_end(world):
    data, student_tok, _ = world
    train = data.train
    long = " the king walks into the hall and the lords bow" * 4
    out = cross_sequence_examples(train, [0], 6, [(long, True)], student_tok, student_tok.eos_token)
    assert int(out.lengths[0]) == train.block_size and out.ids[0, :6].tolist() == train.ids[0, :6].tolist()
    assert out.ids[0, -1].item() != student_tok.eos_token_id  # the end was cut, and the eos with it
    whole = cross_sequence_examples(train, [0], train.block_size, [(" bow", False)], student_tok, None)
    n = int(whole.lengths[0])
    kept = int(whole.prompt_lengths[0])
    assert kept == train.block_size - 1 and n == train.block_size
    assert whole.ids[0, :kept].tolist() == train.ids[0, 1:].tolist()  # the prompt's last tokens
    for token_id, (s, e) in zip(whole.ids[0].tolist(), whole.offsets[0].tolist()):
        assert whole.texts[0][s:e] == student_tok.decode([token_id])


def test_alignment_counts_only_spans_that_predict_the_completion(world):
    data, student_tok, teacher_tok = world
    train, p = data.train, 6
    out = cross_sequence_examples(train, [0], p, [(" and the lords bow to the king", False)], student_tok, None)
    index = [0]
    student = student_encoding(out, index, out.ids[:, :int(out.lengths[0])], out.lengths)
    teacher = teacher_encoding(teacher_tok, out.texts, student, out.eos_id)
    every = block_alignment(out.texts, teacher, student)
    after = block_alignment(out.texts, teacher, student, [p])
    assert any(sp.student[1] < p for sp in every.spans[0])  # spans inside the prompt exist ...
    assert after.spans[0] == [sp for sp in every.spans[0] if sp.student[1] >= p]  # ... and are dropped
    assert after.spans[0] and torch.all(after.index.student_last[0][after.index.mask[0]] >= p - 1)
