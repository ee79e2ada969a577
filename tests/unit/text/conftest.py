"""Shared by the text tests: a tiny labelled corpus, WordPiece tokenizers trained here, tiny random BERT encoders
saved with them (offline, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = {
    "sport": "match goal team player score win league coach season ball",
    "tech": "software chip data network computer code phone internet robot cloud",
    "politics": "vote party election minister law government policy debate bill senate",
}


def wordpiece(corpus: list[str], vocab_size: int, lowercase: bool = True):
    """A BertTokenizerFast trained on `corpus` with [PAD] [UNK] [CLS] [SEP] [MASK] and [CLS] $A [SEP]."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return transformers.BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def save_tiny_bert(folder: Path, tokenizer, seed: int, layers: int = 2) -> Path:
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """(texts folder: 3 classes × 24 texts, encoder folder with tokenizer A, encoder folder with tokenizer B).
    Tokenizer B is trained on a different corpus with another vocabulary size, so its ids differ from A's."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("text_corpus")
    rng = random.Random(0)
    texts = root / "texts"
    for label, words in WORDS.items():
        (texts / label).mkdir(parents=True)
        vocab = words.split()
        for i in range(24):
            n = rng.randint(4, 30)
            (texts / label / f"{i:03d}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(n)))
    words = [w for ws in WORDS.values() for w in ws.split()]
    tok_a = wordpiece(words * 3, 80)
    tok_b = wordpiece(words[::-1] * 2 + ["alpha", "beta", "gamma", "delta"], 120)  # other pieces, other ids
    a = save_tiny_bert(root / "bert-a", tok_a, seed=0)
    b = save_tiny_bert(root / "bert-b", tok_b, seed=1)
    return texts, a, b
