"""Aligning two tokenisations of one text by UTF-8 byte offsets, for distillation across tokenizers.

A teacher and a student with different tokenizers cut the same text into different tokens, so their positions do
not correspond one to one. They do correspond at the byte positions where both tokenisations have a token
boundary: between two such positions lies a run of text ("span") that is a whole number of tokens on each side,
and after the last token of a span both models have read the same text. Cross-tokenizer losses compare the
teacher and the student there (kdkit.losses.uld, hybrid_kl, span_likelihood). The same idea underlies the byte-offset
alignment of TRL's GOLD trainer and the chunks of ALM (Minixhofer et al. 2025, arXiv 2503.20083).

What a span is, exactly (align_offsets):

- **Bytes.** Offsets come from fast tokenizers (return_offsets_mapping) as character offsets into the text and are
  turned into byte offsets of its UTF-8 encoding, so that "é" is two bytes and "日" three.
- **Zero-length tokens are left out**: special tokens added by the post-processor ([CLS], [SEP], <bos>) and padding
  have offsets (0, 0) and belong to no span. Added tokens found in the text itself have real offsets and align like
  any token. (A zero-length token in the middle of a span's token range would be counted in that range.)
- **Pieces.** Tokens whose byte ranges overlap are merged into one piece: byte-level BPE (GPT-2, SmolLM2) and
  SentencePiece byte fallback split a character the vocabulary lacks over several tokens, all of which carry that
  character's offsets (equal or overlapping). A piece is the smallest unit a boundary can fall between, so with
  identical tokenizers there is one span per token, except that the tokens of one split character form one span.
- **Whitespace and other uncovered bytes belong to the following span.** Byte-level BPE puts the space before a
  word inside the word's token ("Ġworld" covers " world"), WordPiece drops it ("world" covers "world"): only token
  ends are boundaries, and the bytes between one piece's end and the next piece's start go with the next piece.
  Before the first piece, the ASCII whitespace immediately in front of it is counted as covered too (a leading
  space that one side keeps and the other drops). Uncovered bytes after the last common boundary belong to no span.
- **Coverage.** Spans lie where both sides cover the text: from the later of the two starts to the earlier of the
  two ends. A side truncated at the end (max_length) ends the alignment at its last token boundary shared with the
  other side; a side truncated at the start begins it at its first boundary shared with the other side.

Spans are found per text by align_offsets; span_index turns the spans of a padded batch into index tensors for the
losses (each span's last token on each side, a span mask, and each token's span); align_batch does both from texts.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from kdkit.errors import CompatibilityError, DataError

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Span:
    """A run of text tokenised into whole tokens on both sides: bytes [byte_start, byte_end) of the UTF-8 text,
    teacher tokens [teacher[0], teacher[1]) and student tokens [student[0], student[1]) (indices into each side's
    encoding as given, special tokens and padding included)."""

    byte_start: int
    byte_end: int
    teacher: tuple[int, int]
    student: tuple[int, int]


@dataclass
class SpanIndex:
    """The spans of a padded batch as index tensors, S = the most spans of any row.

    teacher_last, student_last: (B, S) int64, the position of each span's last token on each side: where both models
    have read the same text (0 where mask is False). mask: (B, S) bool, True for a real span. teacher_span,
    student_span: (B, T_teacher), (B, T_student) int64, the span number of each token, −1 for a token in no span
    (special tokens, padding, text outside the alignment). byte_start, byte_end: (B, S) int64 (0 where masked).
    """

    teacher_last: torch.Tensor
    student_last: torch.Tensor
    mask: torch.Tensor
    teacher_span: torch.Tensor
    student_span: torch.Tensor
    byte_start: torch.Tensor
    byte_end: torch.Tensor

    def to(self, device: torch.device | str) -> SpanIndex:
        return SpanIndex(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass
class Encoded:
    """One side's padded encoding of a batch of texts: input_ids, attention_mask (B, T) int64 and the per-token
    character offsets (B lists of T pairs, (0, 0) for special tokens and padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]


@dataclass
class AlignedBatch:
    """Texts tokenised by both tokenizers and aligned: what the cross-tokenizer losses read. vocab_map: (teacher ids,
    student ids) of the tokens both vocabularies share (kdkit.losses.hybrid_kl.shared_vocab), sent by a source that
    knows it (several teachers: each its own); None: hybrid_kl reads the map it was given."""

    teacher: Encoded
    student: Encoded
    spans: list[list[Span]]
    index: SpanIndex
    vocab_map: tuple[torch.Tensor, torch.Tensor] | None = None


def byte_offsets(text: str, char_offsets: Offsets, side: str = "") -> list[tuple[int, int]]:
    """Character offsets into `text` (as fast tokenizers return them) → byte offsets into text.encode("utf-8").
    side ("teacher", "student") names the tokenisation in the one-line error for offsets of another text."""
    starts = list(accumulate((len(ch.encode("utf-8", "surrogatepass")) for ch in text), initial=0))
    out = []
    for i, (s, e) in enumerate(char_offsets):
        if not 0 <= s <= e <= len(text):
            raise DataError(
                f"{side + ' ' if side else ''}token {i}: offsets ({s}, {e}) outside the text of {len(text)} "
                "characters; expected the offsets of this very text (one text per row, no text pair; no common "
                "text otherwise)"
            )
        out.append((starts[s], starts[e]))
    return out


def _pieces(offsets: Offsets, side: str) -> list[list[int]]:
    """Non-empty byte ranges merged where they overlap: [[start, end, first token, last token + 1], ...]."""
    pieces: list[list[int]] = []
    for i, (s, e) in enumerate(offsets):
        if e <= s:  # special token or padding
            continue
        if pieces and s < pieces[-1][1]:
            if s < pieces[-1][0]:
                raise DataError(
                    f"{side} token {i}: offsets ({s}, {e}) start before the previous token's; expected offsets in "
                    "text order (one text per row, no text pair)"
                )
            pieces[-1][1] = max(pieces[-1][1], e)
            pieces[-1][3] = i + 1
        else:
            pieces.append([s, e, i, i + 1])
    return pieces


def _leading_start(data: bytes, start: int) -> int:
    """start moved back over the ASCII whitespace right before it (a leading space one side keeps)."""
    while start > 0 and data[start - 1 : start].isspace():
        start -= 1
    return start


def align_offsets(text: str, teacher_offsets: Offsets, student_offsets: Offsets) -> list[Span]:
    """The aligned spans of one text, given each side's per-token character offsets (special tokens and padding
    included, as (0, 0)). See the module docstring for what counts as a span. No overlap: an empty list."""
    data = text.encode("utf-8", "surrogatepass")
    sides = []
    for side, offsets in (("teacher", teacher_offsets), ("student", student_offsets)):
        pieces = _pieces(byte_offsets(text, offsets, side), side)
        if not pieces:
            return []
        ends = {p[1]: k for k, p in enumerate(pieces)}
        sides.append((pieces, ends, _leading_start(data, pieces[0][0])))
    (t_pieces, t_ends, t_lo), (s_pieces, s_ends, s_lo) = sides
    # A boundary of both sides lies within both coverages: spans only where both sides cover the text.
    common = sorted(({t_lo} | t_ends.keys()) & ({s_lo} | s_ends.keys()))
    t_piece_ends = [p[1] for p in t_pieces]
    s_piece_ends = [p[1] for p in s_pieces]
    spans = []
    for start, end in zip(common, common[1:]):
        # The pieces of a side within (start, end]: from the first ending after start to the one ending at end.
        t_first, s_first = bisect_right(t_piece_ends, start), bisect_right(s_piece_ends, start)
        t_range = (t_pieces[t_first][2], t_pieces[t_ends[end]][3])
        s_range = (s_pieces[s_first][2], s_pieces[s_ends[end]][3])
        spans.append(Span(start, end, t_range, s_range))
    return spans


def check_fast(tokenizer: Any, side: str) -> None:
    """A CompatibilityError unless `tokenizer` is a fast tokenizer (tokenizers.Tokenizer, or a transformers
    tokenizer with is_fast): a slow (Python) tokenizer has no offsets (and ignores return_offsets_mapping)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer) or getattr(tokenizer, "is_fast", False) is True:
        return
    raise CompatibilityError(
        f"{side} tokenizer: {type(tokenizer).__name__} is a slow tokenizer without offsets; expected a fast "
        "tokenizer (transformers PreTrainedTokenizerFast or tokenizers.Tokenizer) for cross-tokenizer alignment"
    )


def encode(tokenizer: Any, texts: Sequence[str], side: str, max_length: int | None = None) -> Encoded:
    """texts tokenised by one fast tokenizer with offsets, padded to the longest with (0, 0) offsets.

    A transformers tokenizer adds its special tokens, truncates to max_length on its truncation_side and pads on its
    padding_side (pad id: its pad token, else 0). A tokenizers.Tokenizer uses its own post-processor, truncation and
    padding settings; max_length then keeps the first max_length tokens; the batch is padded on the right with id 0
    (the attention mask says which ids are padding).
    """
    check_fast(tokenizer, side)
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        encodings = tokenizer.encode_batch(list(texts))
        ids = [e.ids[:max_length] for e in encodings]
        attention = [e.attention_mask[:max_length] for e in encodings]
        offsets = [list(e.offsets[:max_length]) for e in encodings]
        pad_id, left = 0, False
    else:
        enc = tokenizer(
            list(texts), return_offsets_mapping=True, truncation=max_length is not None, max_length=max_length
        )
        ids, attention = enc["input_ids"], enc["attention_mask"]
        offsets = [[tuple(o) for o in row] for row in enc["offset_mapping"]]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        left = getattr(tokenizer, "padding_side", "right") == "left"
    width = max((len(row) for row in ids), default=0)

    def pad(row: list, value: Any) -> list:
        fill = [value] * (width - len(row))
        return fill + list(row) if left else list(row) + fill

    return Encoded(
        input_ids=torch.tensor([pad(r, pad_id) for r in ids], dtype=torch.long).reshape(len(ids), width),
        attention_mask=torch.tensor([pad(r, 0) for r in attention], dtype=torch.long).reshape(len(ids), width),
        offsets=[[(int(s), int(e)) for s, e in pad(r, (0, 0))] for r in offsets],
    )


def span_index(
    spans: Sequence[Sequence[Span]], teacher_length: int, student_length: int, device: torch.device | None = None
) -> SpanIndex:
    """The spans of each row of a padded batch (token indices into encodings of teacher_length and student_length
    positions) as index tensors (SpanIndex). Rows are padded with masked spans to the most spans of any row."""
    b, s = len(spans), max((len(row) for row in spans), default=0)
    flat = []  # (row, k, teacher start, teacher end, student start, student end, byte start, byte end) per span
    for r, row in enumerate(spans):
        for k, sp in enumerate(row):
            (ta, tb), (sa, sb) = sp.teacher, sp.student
            if tb > teacher_length or sb > student_length:
                raise DataError(
                    f"row {r} span {k}: token ranges {sp.teacher}, {sp.student} beyond the encodings' lengths "
                    f"{teacher_length}, {student_length}; expected spans of these encodings"
                )
            flat.append((r, k, ta, tb, sa, sb, sp.byte_start, sp.byte_end))
    rows, ks, ta, tb, sa, sb, bs, be = torch.tensor(flat, dtype=torch.long).reshape(-1, 8).unbind(1)
    t_last, s_last, b_start, b_end = (torch.zeros(b, s, dtype=torch.long) for _ in range(4))
    mask = torch.zeros(b, s, dtype=torch.bool)
    t_last[rows, ks], s_last[rows, ks], mask[rows, ks] = tb - 1, sb - 1, True
    b_start[rows, ks], b_end[rows, ks] = bs, be
    t_span = _token_spans(rows, ks, ta, tb, b, teacher_length)
    s_span = _token_spans(rows, ks, sa, sb, b, student_length)
    return SpanIndex(t_last, s_last, mask, t_span, s_span, b_start, b_end).to(device or "cpu")


def _token_spans(rows, ks, starts, ends, b: int, length: int) -> torch.Tensor:
    """(b, length) int64: k at the positions [start, end) of each span (row, k), −1 elsewhere."""
    out = torch.full((b, length), -1, dtype=torch.long)
    sizes = ends - starts
    total = int(sizes.sum())
    first = torch.cumsum(sizes, 0) - sizes  # where each span's positions begin in the flat list
    within = torch.arange(total) - first.repeat_interleave(sizes)
    out[rows.repeat_interleave(sizes), starts.repeat_interleave(sizes) + within] = ks.repeat_interleave(sizes)
    return out


def align_batch(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    texts: Sequence[str],
    teacher_max_length: int | None = None,
    student_max_length: int | None = None,
) -> AlignedBatch:
    """texts tokenised by both fast tokenizers (encode), aligned row by row (align_offsets) and indexed (span_index)."""
    teacher = encode(teacher_tokenizer, texts, "teacher", teacher_max_length)
    student = encode(student_tokenizer, texts, "student", student_max_length)
    spans = [align_offsets(x, t, s) for x, t, s in zip(texts, teacher.offsets, student.offsets)]
    index = span_index(spans, teacher.input_ids.shape[1], student.input_ids.shape[1])
    return AlignedBatch(teacher, student, spans, index)


def take(values: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values[b, positions[b, k]] for every real (b, k) (mask True), in row-major order: (B, T, ...) → (N, ...).

    Only the real positions are read (gathered by index), so whatever the masked entries of `positions` hold, and
    whatever `values` holds at unread positions, changes nothing."""
    if positions.shape != mask.shape or positions.dim() != 2 or values.shape[0] != positions.shape[0]:
        raise ValueError(
            f"positions {tuple(positions.shape)} and mask {tuple(mask.shape)} must both be (B, S) for values of "
            f"shape {tuple(values.shape)}"
        )
    rows, k = mask.to(values.device).nonzero(as_tuple=True)
    return values[rows, positions.to(values.device)[rows, k]]
