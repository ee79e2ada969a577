"""Language-model blocks cut by text (kdkit.data.text_blocks, data.block_chars): chunks cut before whitespace, one
block each, the same texts for every tokenizer, their tokens exactly the tokenizer's, truncation counted."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.text_blocks import SEPARATOR, cut_text, text_cut_blocks

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

DOCS = [
    "the king walks into the hall and the lords bow low before him",
    "my lord the queen is sick and calls for her son",
    "what light through yonder window breaks it is the east",
    "antidisestablishmentarianism",
]


def test_cut_text_by_hand():
    assert cut_text("the king walks in", 8) == ["the king", " walks", " in"]
    assert cut_text("abcdefghij klm", 4) == ["abcd", "efgh", "ij", " klm"]  # no whitespace in the window: at 4
    assert cut_text("short", 10) == ["short"] and cut_text("", 5) == []
    assert cut_text("a  b", 1) == ["a", " ", " ", "b"]
    with pytest.raises(ValueError, match="size=0"):
        cut_text("x", 0)


@pytest.mark.parametrize("size", [1, 3, 7, 16, 40])
def test_cut_text_invariants(size):
    for doc in DOCS + ["  leading and trailing  ", "a\nb\tc d"]:
        chunks = cut_text(doc, size)
        assert "".join(chunks) == doc and all(0 < len(c) <= size for c in chunks)
        for left, right in zip(chunks, chunks[1:]):  # a cut before whitespace, or a full window without any
            assert right[0].isspace() or (len(left) == size and not any(ch.isspace() for ch in left[1:]))


def test_same_texts_for_two_tokenizers_their_own_tokens_and_truncation():
    from tests.conftest import bpe_tokenizer

    small, large = bpe_tokenizer(DOCS, 60), bpe_tokenizer(DOCS * 3, 200)
    a = text_cut_blocks(DOCS, small, 24, 20, small.pad_token_id, with_text=True)
    b = text_cut_blocks(DOCS, large, 24, 20, large.pad_token_id, with_text=True)
    assert a.texts == b.texts and len(a.texts) == len(a.ids) and a.ids.shape[1] == 24
    assert not torch.equal(a.ids, b.ids)
    chunks = [c for d in DOCS for c in cut_text(d, 20)]
    ends = {len(cut_text(d, 20)) - 1 + sum(len(cut_text(x, 20)) for x in DOCS[:i]) for i, d in enumerate(DOCS)}
    for cut, tok in ((a, small), (b, large)):
        for k, chunk in enumerate(chunks):
            want = tok(chunk, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if k in ends else [])
            n = int(cut.lengths[k])
            assert cut.ids[k, :n].tolist() == want[:24] and (cut.ids[k, n:] == tok.pad_token_id).all()
            assert cut.texts[k] == chunk + (SEPARATOR if k in ends else "")
            for (s, e), token_id in zip(cut.offsets[k, :n].tolist(), want):  # offsets point at the token's text
                if token_id == tok.eos_token_id:
                    assert cut.texts[k][s:e] == SEPARATOR
                else:
                    assert tok.decode([token_id]) == cut.texts[k][s:e]
        assert cut.truncated == 0 and cut.tokens == int(cut.lengths.sum())
    # A block of fewer tokens than its chunk: the first tokens, the whole text kept, counted.
    tiny = text_cut_blocks(DOCS, small, 4, 20, small.pad_token_id, with_text=True)
    assert tiny.texts == a.texts and tiny.truncated == int((a.lengths > 4).sum()) > 0
    assert torch.equal(tiny.ids, a.ids[:, :4]) and tiny.tokens == a.tokens
    plain = text_cut_blocks(DOCS, small, 24, 20, small.pad_token_id, with_text=False)
    assert torch.equal(plain.ids, a.ids) and plain.texts is None and plain.offsets is None


def test_block_chars_is_a_causal_lm_setting_checked_in_one_line():
    from kdkit.config import load_config
    from kdkit.data.sources import build_data
    from kdkit.errors import ConfigError, DataError

    base = {"run": {"name": "x"}, "data": {"source": "builtin", "name": "digits", "block_chars": 64},
            "teacher": {"members": [{"model": {"source": "builtin", "name": "mlp"}}]},
            "student": {"model": {"source": "builtin", "name": "mlp"}}}
    with pytest.raises(ConfigError, match="block_chars needs task: causal_lm; got task: classification") as e:
        load_config(base)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="block_chars"):
        load_config({**base, "data": {**base["data"], "task": "causal_lm", "block_chars": 8}})  # below 16
    with pytest.raises(DataError, match="data.block_chars: 64 cuts a language model's corpus"):
        build_data("builtin", "digits", block_chars=64)
