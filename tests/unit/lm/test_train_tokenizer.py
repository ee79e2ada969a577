"""A student tokenizer trained by kdkit on the training documents alone (#14, data.train_tokenizer): the corpus is
split by documents before tokenisation, the trainer never sees a test document, the tokenizer is deterministic,
cached and saved with the student, and bits per byte still count the test text's own bytes."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.config import load_config
from kdkit.data.lm import build_lm_data_by_documents, split_documents
from kdkit.data.train_tokenizer import EOS, train_bpe, trained_tokenizer
from kdkit.errors import ConfigError, DataError

SENTENCES = [
    "the king walks into the hall and the lords bow",
    "my lord the queen is sick and calls for her son",
    "what light through yonder window breaks",
    "a horse a horse my kingdom for a horse",
    "to be or not to be that is the question",
]
# One made-up word per document, repeated: a trainer that saw a document would learn its word as one token.
WORDS = ["zorblax", "quixfen", "vambric", "glotrup", "frenzik", "humdrax", "plovnic", "wextral", "jubnoct", "kravile"]


def corpus(folder, n: int = 10):
    """n documents, each the sentences in another order with its own word 40 times; returns (folder, texts)."""
    folder.mkdir(exist_ok=True)
    texts = []
    for i in range(n):
        lines = [SENTENCES[(i + k) % len(SENTENCES)] + f" {WORDS[i]}" for k in range(40)]
        text = ". ".join(lines) + "."
        (folder / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    return folder, texts


def single_token(tok, word: str) -> bool:
    return len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


# ----------------------------------------------------------------------------------------------------------------
# The split by documents
# ----------------------------------------------------------------------------------------------------------------


def test_documents_split_is_seeded_disjoint_and_by_characters():
    texts = [("x" * (100 * (i % 7 + 1))) for i in range(30)]
    train, val, test = split_documents(texts, 0.1, 0.2, seed=3)
    assert (train, val, test) == split_documents(texts, 0.1, 0.2, seed=3)  # the same seed, the same split
    assert sorted(train + val + test) == list(range(30)) and not set(train) & set(val) | set(val) & set(test)
    total = sum(map(len, texts))
    for part, fraction in ((test, 0.2), (val, 0.1)):
        size = sum(len(texts[i]) for i in part)
        # At least the fraction of the characters, overshooting by less than the last document taken.
        assert fraction * total <= size < fraction * total + max(len(texts[i]) for i in part)
    assert any(split_documents(texts, 0.1, 0.2, seed=s)[2] != test for s in range(4, 8))
    assert split_documents(texts, 0.0, 0.2, seed=3)[1] == []  # no val fraction, no val documents


def test_too_few_documents_to_split_is_one_line():
    with pytest.raises(DataError, match=r"has 1 document\(s\); splitting by documents needs at least 3") as e:
        split_documents(["one long text"], 0.1, 0.1, seed=0)
    assert "\n" not in str(e.value)
    assert split_documents(["a", "b"], 0.0, 0.5, seed=0)[0]  # two documents, no val: one each


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_bpe_respects_the_vocabulary_size_and_tokenises_any_text(tmp_path):
    _, texts = corpus(tmp_path / "c")
    tok = train_bpe(texts, 300, 2)
    assert len(tok) == 300 and tok.is_fast  # the corpus has more than enough pairs: exactly the size asked
    assert tok.eos_token == tok.pad_token == EOS and tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    small = train_bpe(["ab ab ab"], 4096, 2)
    assert 257 < len(small) < 4096  # every byte and <eos>, and only the merges the text allows
    for text in ("Ça va? 日本語 ∑ — 🎭", "unseen words: xylophone"):  # nothing is unknown to a byte-level BPE
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Byte-level: the 256 single bytes are in the vocabulary.
    assert sum(len(t) == 1 for t in tok.get_vocab()) >= 256


def test_training_is_deterministic_and_the_cache_gives_the_same_tokenizer(tmp_path):
    _, texts = corpus(tmp_path / "c")
    said: list[str] = []
    first = trained_tokenizer(texts, "bpe", 300, 2, tmp_path / "cache", said.append)
    files = sorted((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".json"] and "trained on 10 training documents" in said[-1]
    again = trained_tokenizer(texts, "bpe", 300, 2, tmp_path / "cache", said.append)
    assert "(cached)" in said[-1] and again.get_vocab() == first.get_vocab()
    assert train_bpe(texts, 300, 2).get_vocab() == first.get_vocab()  # retrained: the very same merges
    sample = texts[3][:200]
    assert again(sample)["input_ids"] == first(sample)["input_ids"]
    trained_tokenizer(texts, "bpe", 290, 2, tmp_path / "cache")  # other settings: their own file
    trained_tokenizer(texts[:-1], "bpe", 300, 2, tmp_path / "cache")  # other texts: their own file
    assert len(list((tmp_path / "cache").iterdir())) == 3  # and no temp file left behind
    with pytest.raises(DataError, match="data.train_tokenizer.kind: 'wordpiece'; expected one of: bpe"):
        trained_tokenizer(texts, "wordpiece", 300, 2)


# ----------------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------------


def build(folder, make, limit=None, with_text=True, block_size=32):
    return build_lm_data_by_documents("text_folder", None, str(folder), None, None, make, block_size, 0.1, 0.2, 0,
                                      limit, with_text=with_text)


def test_no_test_document_reaches_the_tokenizer_trainer(tmp_path):
    folder, texts = corpus(tmp_path / "c")
    seen: list[list[str]] = []

    def make(docs):
        seen.append(list(docs))
        return train_bpe(docs, 400, 2)

    data = build(folder, make)
    train, val, test = split_documents(texts, 0.1, 0.2, 0)
    assert seen == [[texts[i] for i in train]]  # the trainer got the training documents, and only them
    assert val and test
    tok = data.tokenizer
    for i, word in enumerate(WORDS):
        # A word the trainer saw 40 times is one token; a held-out document's word was never merged.
        assert single_token(tok, word) == (i in train), (i, word)


def test_each_split_is_cut_from_its_own_documents(tmp_path):
    folder, texts = corpus(tmp_path / "c")
    data = build(folder, lambda docs: train_bpe(docs, 400, 2))
    train, val, test = split_documents(texts, 0.1, 0.2, 0)
    for part, idx in ((data.train, train), (data.val, val), (data.test, test)):
        own = [texts[i] for i in idx]
        others = [t for k, t in enumerate(texts) if k not in idx]
        for block_text, ids in zip(part.texts, part.ids.tolist()):
            assert block_text == data.tokenizer.decode(ids)  # byte-level: the blocks decode to their text
            for piece in block_text.split(EOS):
                if len(piece) > 20:  # long enough to hold a document's own word
                    assert any(piece in t for t in own) and not any(piece in t for t in others)
    assert data.documents == 10 and data.tokens > 0
    # limit: as many blocks per split as the block split of `limit` blocks (test 20%, val 10%, the rest train).
    small = build(folder, lambda docs: train_bpe(docs, 400, 2), limit=20)
    assert (len(small.train), len(small.val), len(small.test)) == (14, 2, 4)
    assert build(folder, lambda docs: train_bpe(docs, 400, 2), limit=20).test.ids.equal(small.test.ids)  # seeded
    plain = build(folder, lambda docs: train_bpe(docs, 400, 2), with_text=False)
    assert torch.equal(plain.test.ids, data.test.ids) and plain.test.texts is None


def test_bits_per_byte_count_the_test_texts_bytes(tmp_path):
    """lm_metrics' byte count on the test split = the bytes of the test blocks' text that the predicted tokens
    cover, computed by hand from the block texts: all but the first token's text, and no <eos> separator."""
    from kdkit.evaluate.lm import lm_metrics, text_decoder

    folder, _ = corpus(tmp_path / "c")
    data = build(folder, lambda docs: train_bpe(docs, 400, 2))
    test, tok = data.test, data.tokenizer
    expected = 0
    for text, ids, offsets in zip(test.texts, test.ids.tolist(), test.offsets.tolist()):
        rest = text[offsets[0][1]:]
        expected += len(rest.encode()) - len(EOS) * ids[1:].count(tok.eos_token_id)

    def uniform(ids):
        return torch.zeros(*ids.shape, len(tok))

    m = lm_metrics({"u": uniform}, test, 4, "cpu", decode=text_decoder(tok))["u"]
    assert m["bytes"] == expected
    # A uniform model pays log2(V) bits per predicted token.
    assert m["bits_per_byte"] == pytest.approx(math.log2(len(tok)) * m["tokens"] / expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The config, and a run
# ----------------------------------------------------------------------------------------------------------------


def run_config(corpus_folder, teacher, **data) -> dict:
    return {
        "run": {"name": "own_tok", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus_folder),
                 "train_tokenizer": {"vocab_size": 300}, "max_length": 24, "val_fraction": 0.1,
                 "test_fraction": 0.2, **data},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "pretrained": False,
                              "kwargs": {"num_hidden_layers": 1}}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, {"name": "hybrid_kl", "weight": 0.5}],
                    "cache_teacher": False},
        "llm": {"prompt_tokens": 6, "report_samples": 1, "generation": {"max_new_tokens": 4}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "keep_best": "loss"},
        "eval": {"batch_size": 8, "latency_repeats": 2},
    }


def test_train_tokenizer_and_tokenizer_are_exclusive(tmp_path):
    cfg = run_config(tmp_path, tmp_path, tokenizer="some/folder")
    with pytest.raises(ConfigError, match="train_tokenizer and tokenizer .'some/folder'. are both set; expected one"):
        load_config(cfg)
    cfg = run_config(tmp_path, tmp_path)
    cfg["data"]["task"] = "classification"
    with pytest.raises(ConfigError, match="train_tokenizer needs task: causal_lm"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_config(run_config(tmp_path, tmp_path, train_tokenizer={"vocab_size": 100}))


def test_a_run_with_its_own_trained_tokenizer_end_to_end(tmp_path, lm_world):
    from transformers import AutoTokenizer

    from kdkit.evaluate.schema import check_metrics
    from kdkit.pipeline import distill, evaluate_run

    _, teacher, _ = lm_world
    folder, _ = corpus(tmp_path / "c", 6)
    cfg = run_config(folder, teacher)
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    said: list[str] = []
    result = distill(cfg, out=tmp_path / "run", log=said.append)
    m = result.metrics
    check_metrics(m)
    cached = list((tmp_path / "runs" / "cache" / "tokenizers").glob("bpe-300-*.json"))
    assert len(cached) == 1 and any("student tokenizer: bpe of 300 tokens trained on" in s for s in said)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "student"))  # the student carries its tokenizer
    assert len(saved) == 300 and result.student.config.vocab_size == 300
    assert any("cross-tokenizer teacher: its own tokenizer" in s for s in said)
    for key in ("teacher", "baseline_student", "student"):
        assert math.isfinite(m[key]["bits_per_byte"]) and m[key]["bytes"] > 0
    # `kdkit eval` rebuilds the data with the cached tokenizer: the same test blocks, the same figures.
    before = len(said)
    again = evaluate_run(tmp_path / "run", log=said.append)
    assert any(s.startswith("student tokenizer:") and s.endswith("(cached)") for s in said[before:])
    assert again["student"]["bits_per_byte"] == pytest.approx(m["student"]["bits_per_byte"], rel=1e-5)
