"""Language-model data: blocks of the token stream, splits without overlap, labels with -100 on padding/prompts."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.lm import IGNORE, LMData, build_lm_data, concat, predicted_positions, tokenize_corpus
from kdkit.errors import DataError


class CharTokenizer:
    """A stand-in tokenizer: one id per character, eos = 1, pad = 0."""

    eos_token_id = 1
    pad_token_id = 0
    model_max_length = 64

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + (ord(c) % 50) for c in t] for t in texts]}

    def __len__(self):
        return 52


def test_blocks_are_the_concatenated_stream_with_eos_between_documents():
    blocks, tokens = tokenize_corpus(["abc", "de"], CharTokenizer(), 3)
    # stream: a b c <eos> d e <eos> → 7 tokens, 2 blocks of 3, the last token dropped
    a, b, c, d, e = (2 + ord(x) % 50 for x in "abcde")
    assert tokens == 7
    assert blocks.tolist() == [[a, b, c], [1, d, e]]


def test_split_has_no_shared_block_and_is_seeded(tmp_path):
    (tmp_path / "one.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.txt").write_text("pack my box with five dozen liquor jugs " * 20)
    tok = CharTokenizer()
    d1 = build_lm_data("text_folder", None, str(tmp_path), None, None, tok, 16, 0.1, 0.2, 0, None)
    d2 = build_lm_data("text_folder", None, str(tmp_path), None, None, tok, 16, 0.1, 0.2, 0, None)
    assert d1.documents == 2
    rows = [tuple(r.tolist()) for part in (d1.train, d1.val, d1.test) for r in part.ids]
    assert len(rows) == d1.tokens // 16
    assert torch.equal(d1.test.ids, d2.test.ids)
    n = len(d1.train) + len(d1.val) + len(d1.test)
    assert n == d1.tokens // 16 and len(d1.test) == round(n * 0.2)


def test_collate_labels_padding_and_prompts():
    ids = torch.arange(2, 14).view(2, 6)
    data = LMData(ids, torch.tensor([6, 4]), pad_id=0, eos_id=1)
    batch = data.collate([data[0], data[1]])
    assert batch.inputs[1].tolist()[4:] == [0, 0]
    assert batch.labels[1].tolist()[4:] == [IGNORE, IGNORE]
    assert batch.labels[0].tolist() == ids[0].tolist()
    assert predicted_positions(batch.labels).item() == 5 + 3
    data.prompt_lengths = torch.tensor([2, 0])
    batch = data.collate([data[0], data[1]])
    assert batch.labels[0].tolist()[:2] == [IGNORE, IGNORE]
    assert predicted_positions(batch.labels).item() == 4 + 3


def test_concat_pads_shorter_blocks():
    a = LMData(torch.ones(2, 4, dtype=torch.long), None, 0)
    b = LMData(torch.full((1, 6), 3), torch.tensor([5]), 0)
    both = concat([a, b])
    assert both.ids.shape == (3, 6) and both.lengths.tolist() == [4, 4, 5]
    assert both.ids[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_clear_errors(tmp_path):
    tok = CharTokenizer()
    with pytest.raises(DataError, match="data.name: unknown corpus 'poems'"):
        build_lm_data("builtin", "poems", None, None, None, tok, 8, 0.1, 0.2, 0, None)
    with pytest.raises(DataError, match="data.path: .* neither a .txt file nor a folder"):
        build_lm_data("text_folder", None, str(tmp_path / "nope"), None, None, tok, 8, 0.1, 0.2, 0, None)
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="fewer than one block of 32"):
        build_lm_data("text_folder", None, str(tmp_path), None, None, tok, 32, 0.1, 0.2, 0, None)
    with pytest.raises(DataError, match="data.max_length: 100 tokens per block; the tokenizer's context is 64"):
        build_lm_data("text_folder", None, str(tmp_path), None, None, tok, 100, 0.1, 0.2, 0, None)
