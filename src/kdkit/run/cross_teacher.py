"""A teacher with another tokenizer than the student's, as the engine's teacher source: the same text, its own tokens.

The student trains on blocks of its own token stream (kdkit.data.lm with_text: every block keeps its text and each
token's offsets into it). For a batch, CrossTeacher looks the blocks' texts up by batch.index, tokenises them with
the teacher's tokenizer (teacher_encoding), aligns the two tokenisations by byte offsets (kdkit.data.align), runs
the frozen teacher on its own ids and returns its logits (B, T_teacher, V_teacher) with the alignment
(ModelOutputs.alignment), which the cross-tokenizer losses read (uld, hybrid_kl, span_likelihood).

How the teacher reads a block (teacher_encoding): each document piece of the block text is tokenised on its own,
without special tokens, and the teacher's end-of-sequence token stands where the student's stands, covering the
same separator text: the teacher's input is built the way the student's stream was (kdkit.data.lm), so both
predict the next document's start after an end-of-sequence token, and that position is aligned too. The block is
cut from a longer text: where it starts inside a word, the teacher tokenises the word's tail as a word of its own
(the student's first tokens are the stream's); rows longer than the teacher's context are cut at max_length. The
teacher reads the whole block text, also past the student's last token (a block cut by text whose tokens did not all
fit, kdkit.data.text_blocks), so its tokens depend on the text alone.
With the same vocabulary on both sides the teacher reads the student's own ids and offsets (nothing is
re-tokenised), so the alignment is the identity over tokens and hybrid_kl is token_kl exactly.

Which aligned positions count (block_alignment): the spans of kdkit.data.align, without the span that holds the
block's last real student token. After it, neither model's next token is in the block (token_kl skips that
position too), and the cut may have split a word that the teacher would tokenise otherwise.

From the offline cache (CachedCrossTeacher, kdkit.data.cross_cache): `kdkit cache-teacher` stores the teacher's
tokens of every block (teacher_tokens, the same teacher_encoding) with its top-k per teacher position and the
log-prob of each realised teacher token; training then aligns the student's tokens to the cached teacher offsets
(block_alignment, as above) and sends the top-k (ModelOutputs.sparse) and those log-probs
(features[TEACHER_TOKEN_LOGPROBS]) instead of logits: no teacher runs. The cache is keyed by the teacher, its
tokenizer and context (cross_cache_key) and the blocks' texts, not by the student.

No common text: a batch whose blocks (two real student tokens or more) yield not one aligned span is refused in one
line naming the teacher's tokenizer (check_aligned): the two tokenisations share no token boundary, so they are not
of the same text (offsets into another text, or a tokenizer whose offsets cover nothing); the loss would silently
be 0. CrossTeacher checks its first batch when it is built, before any phase trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdkit.data.align import AlignedBatch, Encoded, Span, align_offsets, check_fast, span_index
from kdkit.data.cross_cache import CrossTopKCache, TeacherTokens
from kdkit.data.lm import LMData
from kdkit.errors import DataError
from kdkit.losses.span_likelihood import TEACHER_TOKEN_LOGPROBS
from kdkit.types import Batch, ModelOutputs


def same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Both tokenizers map every token to the same id (get_vocab equal, added tokens included)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def student_encoding(data: LMData, index: Sequence[int], inputs: torch.Tensor, lengths: torch.Tensor) -> Encoded:
    """The student's side of the alignment from what the blocks store: the batch's ids (B, T) as they are, the
    attention mask from the real lengths, and each token's offsets into its block's text ((0, 0) on padding)."""
    b, t = inputs.shape
    real = torch.arange(t)[None, :] < lengths[:, None]
    offsets = data.offsets[torch.as_tensor(list(index), dtype=torch.long), :t].clone()
    offsets[~real] = 0
    return Encoded(inputs.long(), real.long(), [[(int(s), int(e)) for s, e in row] for row in offsets.tolist()])


def pad_id_of(tokenizer: Any) -> int:
    """The id a batch of this tokenizer's rows is padded with: its pad token, else its eos token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def teacher_encoding(
    tokenizer: Any,
    texts: Sequence[str],
    student: Encoded,
    student_eos: int | None,
    max_length: int | None = None,
    separators: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> Encoded:
    """The teacher's tokens of each block text (module docstring): the document pieces between the separators
    tokenised on their own (fast tokenizer, no special tokens, character offsets shifted into the block text), the
    teacher's end-of-sequence token at each separator with the separator's offsets; the first max_length tokens of
    a row are kept; right-padded (pad_id_of) with (0, 0) offsets. separators: each row's separator spans (LMData.
    separators: from the text alone for blocks cut by text); by default the student's end-of-sequence tokens'."""
    check_fast(tokenizer, "teacher")
    teacher_eos = tokenizer.eos_token_id
    rows: list[list[tuple[str, Any]]] = []  # per row: ("text", (start, end)) pieces and ("eos", (start, end))
    pieces: list[str] = []
    for r, text in enumerate(texts):
        row, at = [], 0
        if separators is None:
            real = int(student.attention_mask[r].sum())
            ids = student.input_ids[r, :real].tolist()
            seps = [student.offsets[r][k] for k, token_id in enumerate(ids)
                    if student_eos is not None and token_id == student_eos]
        else:
            seps = separators[r]
        for s, e in seps:
            if s > at:
                row.append(("text", (at, s)))
            row.append(("eos", (s, e)))
            at = e
        end = len(text)  # the whole text: where the student's tokens stop (a truncated text-cut block) changes nothing
        if end > at:
            row.append(("text", (at, end)))
        rows.append(row)
        pieces += [text[a:b] for kind, (a, b) in row if kind == "text"]
    enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True) if pieces else None
    out_ids, out_offsets, n = [], [], 0
    for row in rows:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for kind, (a, b) in row:
            if kind == "eos":
                if teacher_eos is not None:
                    ids.append(int(teacher_eos))
                    offsets.append((a, b))
                continue
            ids += enc["input_ids"][n]
            offsets += [(a + s, a + e) for s, e in enc["offset_mapping"][n]]
            n += 1
        if max_length is not None:
            ids, offsets = ids[:max_length], offsets[:max_length]
        out_ids.append(ids)
        out_offsets.append(offsets)
    width = max((len(r) for r in out_ids), default=0)
    if width == 0:
        raise DataError("cross-tokenizer teacher: the blocks' texts hold no token for the teacher's tokenizer")
    pad = pad_id_of(tokenizer)
    return Encoded(
        torch.tensor([r + [pad] * (width - len(r)) for r in out_ids], dtype=torch.long),
        torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in out_ids], dtype=torch.long),
        [o + [(0, 0)] * (width - len(o)) for o in out_offsets],
    )


def check_aligned(aligned: AlignedBatch, index: Sequence[int], where: str = "teacher",
                  prompts: Sequence[int] | None = None) -> None:
    """A one-line DataError when no row of the batch with at least two real student tokens after its prompt
    (prompts[r], 0 by default) has an aligned span (module docstring: no common text)."""
    lengths = aligned.student.attention_mask.sum(1).tolist()
    prompts = [0] * len(lengths) if prompts is None else list(prompts)
    rows = [r for r, n in enumerate(lengths) if n - prompts[r] >= 2]
    if rows and not any(aligned.spans[r] for r in rows):
        blocks = ", ".join(str(index[r]) for r in rows[:4]) + (", ..." if len(rows) > 4 else "")
        raise DataError(
            f"{where}: no aligned text with the student's tokens on blocks {blocks} (not one token boundary in "
            "common); expected two tokenisations of the same text: the teacher's tokenizer must return offsets "
            "into the text it reads (a fast tokenizer)"
        )


def block_alignment(texts: Sequence[str], teacher: Encoded, student: Encoded,
                    prompts: Sequence[int] | None = None) -> AlignedBatch:
    """align_offsets row by row, without the span that holds a row's last real student token (module docstring)
    and, for a row whose first prompts[r] student tokens are context (sequence-level KD examples), without the spans
    that end before the prompt's last token (what comes after them is the prompt, not a target); indexed for the
    losses (span_index)."""
    spans: list[list[Span]] = []
    prompts = [0] * len(texts) if prompts is None else list(prompts)
    for text, t_off, s_off, mask, prompt in zip(texts, teacher.offsets, student.offsets, student.attention_mask,
                                                prompts):
        last = int(mask.sum()) - 1
        spans.append([sp for sp in align_offsets(text, t_off, s_off) if prompt <= sp.student[1] and
                      sp.student[1] - 1 < last])
    index = span_index(spans, teacher.input_ids.shape[1], student.input_ids.shape[1])
    return AlignedBatch(teacher, student, spans, index)


class CrossTeacher:
    """The teacher source for a teacher whose tokenizer differs from the student's (module docstring).

    teacher: the frozen teacher (a TeacherEnsemble whose members share one tokenizer), called on its own ids.
    data: the LMData the engine trains on (its blocks with texts; batch.index indexes it). max_length: the most
    tokens per row the teacher reads (its context). same: the tokenizers share the vocabulary (same_vocabulary):
    the teacher reads the student's ids. where: how errors name the teacher's tokenizer (teacher.members.0). hidden:
    every loss part that reads the teacher reads it at the aligned positions only (WeightedLoss.teacher_at_positions),
    so a causal-LM teacher gives its last hidden state and head (Teacher.hidden_forward) and its head runs at those
    positions only (kdkit.losses.at_positions), not over its whole (B, T_teacher, V_teacher) logits. The first
    blocks are aligned once here (check_aligned), so tokenisations with no common text fail before training."""

    def __init__(self, teacher, teacher_tokenizer: Any, student_tokenizer: Any, data: LMData,
                 max_length: int | None = None, where: str = "teacher", hidden: bool = False):
        if data.texts is None:
            raise DataError("cross-tokenizer teacher: the training blocks carry no text; build them with_text")
        self.teacher, self.tokenizer, self.data, self.max_length = teacher, teacher_tokenizer, data, max_length
        self.hidden = hidden and hasattr(teacher, "hidden_forward")
        self.same = same_vocabulary(teacher_tokenizer, student_tokenizer)
        self.where = where
        self.vocab_map = None  # (teacher ids, student ids) sent with every alignment, for hybrid_kl (several teachers)
        if len(data):
            self.align(data.collate([data[i] for i in range(min(8, len(data)))]))

    def align(self, batch: Batch) -> AlignedBatch:
        """The batch's blocks in both tokenisations, aligned (on the CPU)."""
        index = batch.index.tolist()
        inputs = batch.inputs.cpu()
        lengths = (batch.attention_mask.sum(1) if batch.attention_mask is not None
                   else torch.full((inputs.shape[0],), inputs.shape[1])).cpu()
        texts = [self.data.texts[i] for i in index]
        student = student_encoding(self.data, index, inputs, lengths)
        if self.same:
            teacher = student
        else:
            teacher = teacher_encoding(self.tokenizer, texts, student, self.data.eos_id, self.max_length,
                                       self.data.separators(index))
        prompts = self.data.prompt_lengths[index].tolist()
        aligned = block_alignment(texts, teacher, student, prompts)
        check_aligned(aligned, index, self.where, prompts)
        return aligned

    def teacher_data(self, data: LMData, batch_size: int = 64) -> LMData:
        """The teacher's own tokens of every block of `data` (with texts) as LMData: its perplexity and bits per
        byte on the same text are measured on these (kdkit.evaluate.lm.lm_metrics). The same vocabulary: `data`."""
        if self.same:
            return data
        if data.texts is None:
            raise DataError("cross-tokenizer teacher: the blocks carry no text; build them with_text")
        rows, lengths = [], []
        for start in range(0, len(data), batch_size):
            index = list(range(start, min(start + batch_size, len(data))))
            student = student_encoding(data, index, data.ids[index], data.lengths[index])
            enc = teacher_encoding(self.tokenizer, [data.texts[i] for i in index], student, data.eos_id,
                                   self.max_length, data.separators(index))
            rows += list(enc.input_ids)
            lengths += enc.attention_mask.sum(1).tolist()
        width = max(len(r) for r in rows)
        pad = pad_id_of(self.tokenizer)
        ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=pad) for r in rows])
        return LMData(ids, torch.tensor(lengths), pad, self.tokenizer.eos_token_id)

    def __call__(self, batch: Batch) -> ModelOutputs:
        aligned = self.align(batch)
        device = batch.inputs.device
        ids = aligned.teacher.input_ids.to(device)
        out = self.teacher.hidden_forward(ids) if self.hidden else self.teacher(ids)
        self.vocab_map = send(aligned, self.vocab_map, device)
        return ModelOutputs(logits=out.logits, hidden=out.hidden, head=out.head, alignment=aligned)


def send(aligned: AlignedBatch, vocab_map, device):
    """The alignment's index, and the source's shared-vocabulary map if it has one, on the batch's device; returns
    the map there, for the source to keep (moved once, not every step)."""
    aligned.index = aligned.index.to(device)
    if vocab_map is not None:
        vocab_map = tuple(ids.to(device) for ids in vocab_map)  # a no-op once they are there
        aligned.vocab_map = vocab_map
    return vocab_map


# ---------------------------------------------------------------------------------------------------------------
# From the offline cache across tokenizers


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's full definition (its tokenizer.json: vocabulary, merges, normalisation, pre-
    tokenisation, added tokens) and its eos id: what its tokenisation of a text depends on."""
    import hashlib

    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    eos = getattr(tokenizer, "eos_token_id", None)
    return hashlib.sha256(f"{backend.to_str()}|eos={eos}".encode()).hexdigest()


def cross_cache_key(teacher_fingerprint: str, tokenizer: Any, max_length: int | None, same: bool) -> str:
    """The teacher's side of the cache key across tokenizers: its weights and how it runs (teacher_fingerprint),
    its tokenizer, its context (max_length cuts its rows) and whether it reads the student's ids (same vocabulary)
    or its own tokenisation. Not the student."""
    import hashlib

    parts = f"{teacher_fingerprint}|{tokenizer_fingerprint(tokenizer)}|max_length={max_length}|same={same}"
    return "cross:" + hashlib.sha256(parts.encode()).hexdigest()


def teacher_tokens(tokenizer: Any, data: LMData, max_length: int | None, same: bool = False,
                   batch_size: int = 64) -> TeacherTokens:
    """The teacher's tokens of every block of `data` (with texts), exactly as CrossTeacher.align computes them per
    batch (teacher_encoding; the same vocabulary: the student's ids and offsets), right-padded to the longest row."""
    if data.texts is None:
        raise DataError("cross-tokenizer teacher: the blocks carry no text; build them with_text")
    rows, offsets = [], []
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        student = student_encoding(data, index, data.ids[index], data.lengths[index])
        enc = student if same else teacher_encoding(tokenizer, [data.texts[i] for i in index], student,
                                                    data.eos_id, max_length, data.separators(index))
        for r in range(len(index)):
            n = int(enc.attention_mask[r].sum())
            rows.append(enc.input_ids[r, :n])
            offsets.append(torch.tensor(enc.offsets[r][:n], dtype=torch.long).reshape(n, 2))
    width = max(len(r) for r in rows)
    pad = pad_id_of(tokenizer)
    ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=pad) for r in rows])
    offs = torch.stack([torch.nn.functional.pad(o, (0, 0, 0, width - len(o))) for o in offsets])
    return TeacherTokens(ids, torch.tensor([len(r) for r in rows]), offs)


class CachedCrossTeacher:
    """The teacher source of a cross-tokenizer run from its offline cache (module docstring): no teacher model.

    cache: the CrossTopKCache of `data` (its blocks with texts; batch.index indexes both). Each call aligns the
    batch's student tokens to the cached teacher tokens and returns ModelOutputs(logits=None, sparse=the teacher's
    top-k (B, T_t, k), features={TEACHER_TOKEN_LOGPROBS: (B, T_t)}, alignment). The first blocks are aligned here
    (check_aligned), as CrossTeacher does."""

    def __init__(self, cache: CrossTopKCache, data: LMData, where: str = "teacher"):
        if data.texts is None:
            raise DataError("cross-tokenizer teacher: the training blocks carry no text; build them with_text")
        if len(cache) != len(data):
            raise DataError(f"teacher cache across tokenizers {cache.path}: {len(cache)} blocks, the training data "
                            f"{len(data)}; expected the cache of these blocks")
        self.cache, self.data, self.where = cache, data, where
        self.vocab_map = None  # as CrossTeacher's
        if len(data):
            self.align(data.collate([data[i] for i in range(min(8, len(data)))]))

    def align(self, batch: Batch):
        """(the batch's blocks aligned with the cached teacher tokens, the cached rows), on the CPU."""
        index = batch.index.tolist()
        inputs = batch.inputs.cpu()
        lengths = (batch.attention_mask.sum(1) if batch.attention_mask is not None
                   else torch.full((inputs.shape[0],), inputs.shape[1])).cpu()
        rows = self.cache.lookup(index)
        teacher = Encoded(rows.ids, rows.attention_mask, rows.offsets)
        student = student_encoding(self.data, index, inputs, lengths)
        prompts = self.data.prompt_lengths[index].tolist()
        aligned = block_alignment([self.data.texts[i] for i in index], teacher, student, prompts)
        check_aligned(aligned, index, self.where, prompts)
        return aligned, rows

    def __call__(self, batch: Batch) -> ModelOutputs:
        aligned, rows = self.align(batch)
        device = batch.inputs.device
        self.vocab_map = send(aligned, self.vocab_map, device)
        return ModelOutputs(logits=None, sparse=rows.sparse.to(device),
                            features={TEACHER_TOKEN_LOGPROBS: rows.token_logprobs.to(device)}, alignment=aligned)
