"""Shared by every test tier: a small text corpus, a byte-level BPE tokenizer trained here, and a tiny random-init
Llama teacher saved with it, for the language-model tests (offline, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

SENTENCES = [
    "the king walks into the hall and the lords bow",
    "my lord the queen is sick and calls for her son",
    "what light through yonder window breaks",
    "a horse a horse my kingdom for a horse",
    "to be or not to be that is the question",
    "all the world is a stage and all the men and women merely players",
]


def bpe_tokenizer(corpus: list[str], vocab_size: int = 120):
    """A GPT-2-style byte-level BPE PreTrainedTokenizerFast with <eos> (also used for padding)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny_llama(folder: Path, tokenizer, seed: int, layers: int = 4, hidden: int = 32) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def lm_world(tmp_path_factory):
    """(corpus folder of .txt files, teacher folder with its tokenizer, another tokenizer's model folder)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("lm_world")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    docs = []
    for i in range(6):
        text = ". ".join(rng.choice(SENTENCES) for _ in range(40))
        (corpus / f"doc{i}.txt").write_text(text)
        docs.append(text)
    tok = bpe_tokenizer(docs)
    teacher = save_tiny_llama(root / "teacher", tok, seed=0)
    other = save_tiny_llama(root / "other", bpe_tokenizer([d[::-1] for d in docs], 100), seed=1, layers=2)
    return corpus, teacher, other
