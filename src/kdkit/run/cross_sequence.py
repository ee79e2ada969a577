"""Sequence-level KD across tokenizers: the teacher writes text, the student reads it in its own tokens.

Text is the interface. For each chosen training block (its text and offsets kept, kdkit.data.lm with_text), the
prompt is the text of the block's first p student tokens (llm.prompt_tokens). The teacher reads that text in its own
tokens, exactly as it reads any block (teacher_prompts: kdkit.run.cross_teacher.teacher_encoding), continues it
(kdkit.generation.generate), and its continuation is decoded back to text (completion_text). The example the student
trains on (cross_sequence_examples) is the prompt's own student tokens, then the student's tokens of that text, then
the student's end-of-sequence token with its separator text where the teacher ended; it keeps its text and offsets
like any block, and its prompt tokens are context (LMData.prompt_lengths): token_ce predicts the completion only, and
the cross-tokenizer losses compare the two models only where the next text is the completion's
(kdkit.run.cross_teacher.block_alignment).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdkit.data.lm import LMData
from kdkit.run.cross_teacher import student_encoding, teacher_encoding


def _prompt_texts(data: LMData, rows: Sequence[int], p: int) -> tuple[list[str], torch.Tensor]:
    """(the text of each row's first p student tokens, their lengths in tokens)."""
    lengths = torch.clamp(data.lengths[list(rows)], max=p)
    texts = []
    for row, n in zip(rows, lengths.tolist()):
        end = int(data.offsets[row, :n, 1].max()) if n else 0
        texts.append(data.texts[row][:end])
    return texts, lengths


def teacher_prompts(tokenizer: Any, data: LMData, rows: Sequence[int], p: int, max_length: int | None) -> list:
    """The teacher's own tokens of each row's prompt text (the text of its first p student tokens), as it reads that
    text in training (teacher_encoding: document pieces on their own, its end-of-sequence token at separators)."""
    texts, lengths = _prompt_texts(data, rows, p)
    width = int(lengths.max())
    student = student_encoding(data, rows, data.ids[list(rows), :width], lengths)
    enc = teacher_encoding(tokenizer, texts, student, data.eos_id, max_length)
    return [enc.input_ids[r, : int(enc.attention_mask[r].sum())].tolist() for r in range(len(rows))]


def completion_text(tokenizer: Any, prompt: Sequence[int], completion: Sequence[int]) -> tuple[str, bool]:
    """(the text the teacher wrote after its prompt, whether it ended with its end-of-sequence token).

    Decoded as the text that prompt + completion adds to the prompt's own text, so a word or a space that a
    tokenizer only writes in context (a leading space, a byte-fallback character split across tokens) is kept; the
    completion alone where the two decodings do not share that prefix."""
    eos = tokenizer.eos_token_id
    completion = list(completion)
    ended = bool(completion) and eos is not None and completion[-1] == eos
    body = completion[:-1] if ended else completion

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prefix, full = decode(prompt), decode(list(prompt) + body)
    return (full[len(prefix):] if full.startswith(prefix) else decode(body)), ended


def cross_sequence_examples(data: LMData, rows: Sequence[int], p: int, completions: Sequence[tuple[str, bool]],
                            tokenizer: Any, eos_text: str | None) -> LMData | None:
    """The student's examples (module docstring) as LMData of data.block_size positions, with texts and offsets;
    None when no completion holds a student token. completions: (text, ended) per row (completion_text); tokenizer:
    the student's (fast); eos_text: the text its end-of-sequence token stands for in block texts (kdkit.data.lm).

    Too long for a block: the completion is cut at its end; a prompt of the whole block keeps its last
    block_size - 1 tokens (the context nearest the completion), as kdkit.generation.generate.sequence_kd_examples."""
    block, pad, eos = data.block_size, data.pad_id, data.eos_id
    prompt_texts, prompt_lengths = _prompt_texts(data, rows, p)
    ids, lengths, prompts, texts, offsets = [], [], [], [], []
    for row, n, prompt_text, (text, ended) in zip(rows, prompt_lengths.tolist(), prompt_texts, completions):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else None
        if enc is None or not enc["input_ids"]:
            continue
        at = len(prompt_text)
        row_ids = data.ids[row, :n].tolist() + list(enc["input_ids"])
        row_offsets = data.offsets[row, :n].tolist() + [[at + s, at + e] for s, e in enc["offset_mapping"]]
        full = prompt_text + text
        if ended and eos is not None and eos_text is not None:
            row_ids.append(int(eos))
            row_offsets.append([len(full), len(full) + len(eos_text)])
            full += eos_text
        cut = max(0, n - (block - 1))  # prompt tokens dropped from the start
        row_ids, row_offsets, n = row_ids[cut:][:block], row_offsets[cut:][:block], n - cut
        start = row_offsets[0][0] if cut else 0
        end = max(e for _, e in row_offsets)
        texts.append(full[start:end])
        offsets.append([[max(0, s - start), max(0, e - start)] for s, e in row_offsets])
        ids.append(row_ids)
        lengths.append(len(row_ids))
        prompts.append(n)
    if not ids:
        return None
    out_ids = torch.full((len(ids), block), pad, dtype=torch.long)
    out_offsets = torch.zeros(len(ids), block, 2, dtype=torch.int32)
    for r, (row_ids, row_offsets) in enumerate(zip(ids, offsets)):
        out_ids[r, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        out_offsets[r, : len(row_offsets)] = torch.tensor(row_offsets, dtype=torch.int32)
    out = LMData(out_ids, torch.tensor(lengths), pad, eos, texts, out_offsets)
    out.prompt_lengths = torch.tensor(prompts)
    return out
