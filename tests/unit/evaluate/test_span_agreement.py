"""Span agreement across tokenizers against hand-checked cases, and the invariant with one prefix-free vocabulary:
it is plain top-1 agreement on the same positions."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.align import SpanIndex
from kdkit.evaluate.span_agreement import continuations_agree, span_agreement_counts, token_text


def index_of(student_last: list[list[int]], teacher_last: list[list[int]], mask: list[list[bool]]) -> SpanIndex:
    """A SpanIndex with only the fields span_agreement reads set for real (the others are not read)."""
    s, t, m = torch.tensor(student_last), torch.tensor(teacher_last), torch.tensor(mask)
    empty = torch.zeros_like(s)
    return SpanIndex(t, s, m, empty, empty, empty, empty)


def one_hot_logits(top: list[list[int]], vocab: int) -> torch.Tensor:
    """(B, T, V) logits whose argmax at [b, t] is top[b][t]."""
    return torch.nn.functional.one_hot(torch.tensor(top), vocab).float() * 5.0 - 1.0


@pytest.mark.parametrize(
    ("a", "b", "agree"),
    [
        (" the", " th", True),  # the teacher's vocabulary cuts the same text later
        (" th", " the", True),
        ("ing", "ing", True),
        (" the", " a", False),
        (" the", "the", False),  # the leading space is text
        ("", "", False),  # a token that stands for no text predicts nothing to compare
        ("", "x", False),
    ],
)
def test_continuations_agree(a, b, agree):
    assert continuations_agree(a, b) is agree


STUDENT = {0: " the", 1: " a", 2: "", 3: "ing"}
TEACHER = {0: " th", 1: "in", 2: " b"}


def test_counts_by_hand():
    # Row 0: two spans (student 0 ↔ teacher 0, student 2 ↔ teacher 1); row 1: one real span (student 1 ↔ teacher 1)
    # and a masked one that would agree if it were read (student 0 " the" ↔ teacher 0 " th").
    index = index_of([[0, 2], [1, 0]], [[0, 1], [1, 0]], [[True, True], [True, False]])
    student = one_hot_logits([[0, 1, 3], [0, 2, 1]], 4)  # " the", " a", "ing" / " the", "", " a"
    teacher = one_hot_logits([[0, 1], [0, 1]], 3)  # " th", "in" / " th", "in"
    # " the"|" th" agree, "ing"|"in" agree, ""|"in" does not: 2 of 3 real spans.
    assert span_agreement_counts(student, teacher, index, STUDENT.get, TEACHER.get) == (2, 3)
    teacher = one_hot_logits([[0, 2], [0, 1]], 3)  # the second span's teacher now says " b": "ing"|" b" disagree
    assert span_agreement_counts(student, teacher, index, STUDENT.get, TEACHER.get) == (1, 3)


def test_no_span_counts_nothing():
    index = index_of([[0]], [[0]], [[False]])
    assert span_agreement_counts(one_hot_logits([[0]], 4), one_hot_logits([[0]], 3), index, STUDENT.get,
                                 TEACHER.get) == (0, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_prefix_free_vocabulary_is_plain_top1_agreement(seed):
    """Identical tokenizers: every token is a span (the last position of each side), and with a decoding where no
    token's text is a prefix of another's, span agreement is argmax equality at those positions, exactly."""
    g = torch.Generator().manual_seed(seed)
    b, t, v = 4, 9, 5  # few ids: many agreements and many disagreements
    student, teacher = torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g)
    lengths = torch.tensor([9, 7, 3, 1])
    positions = torch.arange(t - 1).expand(b, t - 1)
    mask = positions < (lengths - 1)[:, None]  # every real position but a row's last
    index = SpanIndex(positions, positions, mask, *(torch.zeros(b, t - 1, dtype=torch.long),) * 4)
    text = "<{}>".format  # prefix-free: ">" ends every token's text
    got = span_agreement_counts(student, teacher, index, text, text)
    equal = student.argmax(-1) == teacher.argmax(-1)
    expected = sum(int(equal[r, : int(n) - 1].sum()) for r, n in enumerate(lengths))
    assert got == (expected, int(mask.sum())) and 0 < expected < int(mask.sum())
    # A vocabulary in which id 1's text starts id 0's: the prefix rule counts those pairs too, so never fewer.
    words = {0: " the", 1: " th", 2: " a", 3: "ing", 4: "x"}
    more, spans = span_agreement_counts(student, teacher, index, words.get, words.get)
    s_top, t_top = student.argmax(-1).tolist(), teacher.argmax(-1).tolist()
    pairs = sum({s_top[r][k], t_top[r][k]} == {0, 1} for r, n in enumerate(lengths.tolist()) for k in range(n - 1))
    assert (more, spans) == (expected + pairs, int(mask.sum())) and pairs > 0


def test_shapes_are_checked():
    index = index_of([[0]], [[0]], [[True]])
    with pytest.raises(ValueError, match=r"student_logits \(1, 4\), teacher_logits \(1, 1, 3\); expected"):
        span_agreement_counts(torch.zeros(1, 4), torch.zeros(1, 1, 3), index, STUDENT.get, TEACHER.get)


def test_token_text_decodes_each_id_once_with_special_tokens_kept():
    class Tokenizer:
        def __init__(self):
            self.calls = []

        def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
            self.calls.append((tuple(ids), skip_special_tokens, clean_up_tokenization_spaces))
            return {0: "</s>", 1: " the"}[ids[0]]

    tok = Tokenizer()
    text = token_text(tok)
    assert [text(1), text(0), text(1)] == [" the", "</s>", " the"]
    assert tok.calls == [((1,), False, False), ((0,), False, False)]  # cached per id
