"""Top-1 agreement across tokenizers: do the student and a teacher with another vocabulary start the same text?

Tokens of two vocabularies cannot be compared by id (id 42 is " the" on one side and "ing" on the other), and at
most positions the two models have not even read the same text. They have at the end of each aligned span
(kdkit.data.align: the byte position where both tokenisations have a boundary). There, each model's greedy next
token (argmax of its logits) is decoded to text, and the two agree when both texts are non-empty and one is a prefix
of the other: they start the same continuation (" the" and " th" agree, one vocabulary merely cuts the text
later; " the" and " a" do not). Empty texts never agree: a token that stands for no text predicts nothing to compare.

    span_agreement = (spans where the greedy continuations agree) / (aligned spans)

With identical tokenizers every token is a span and equal ids decode to equal texts, so the count includes every
position where plain top-1 agreement (argmax equal) holds; it equals plain agreement exactly when no token's text
in the vocabulary is a proper prefix of another's that the two models chose (with a prefix-free decoding, such as
one that names each id, the two are the same number). With a vocabulary that holds " th" and " the" it is at
least plain agreement: the prefix rule counts " th" against " the" as the same start.

Each token is decoded on its own (token_text): special tokens as their own text (two different end-of-text
tokens disagree), SentencePiece decoders may drop a piece's leading space, and a token that is part of one UTF-8
character decodes to U+FFFD; these make the figure approximate across tokenizer families, not across seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from kdkit.data.align import SpanIndex, take

TokenText = Callable[[int], str]  # a token id → the text it stands for


def continuations_agree(a: str, b: str) -> bool:
    """Both texts non-empty and one a prefix of the other (module docstring)."""
    return bool(a) and bool(b) and (a.startswith(b) or b.startswith(a))


def span_agreement_counts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    index: SpanIndex,
    student_text: TokenText,
    teacher_text: TokenText,
) -> tuple[int, int]:
    """(agreeing spans, spans) of a batch: at each real span's last token on each side (index.student_last,
    index.teacher_last where index.mask), the greedy next tokens of student_logits (B, T_student, V_student) and
    teacher_logits (B, T_teacher, V_teacher), decoded by student_text and teacher_text, agree as
    continuations_agree says. Ties in the argmax: the first index (torch.argmax)."""
    if student_logits.dim() != 3 or teacher_logits.dim() != 3 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)}; expected "
            "(B, T, V) each, with the same batch size B"
        )
    student_next = take(student_logits, index.student_last, index.mask).argmax(-1).tolist()
    teacher_next = take(teacher_logits, index.teacher_last, index.mask).argmax(-1).tolist()
    agree = sum(continuations_agree(student_text(s), teacher_text(t)) for s, t in zip(student_next, teacher_next))
    return agree, len(student_next)


def token_text(tokenizer: Any) -> TokenText:
    """A Hugging Face tokenizer's text of one token id, cached per id: special tokens kept as their own text (so
    that both models predicting their end of text agree with one tokenizer), spaces left as they are."""

    @cache
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return text
