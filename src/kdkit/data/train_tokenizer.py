"""A student tokenizer trained by kdkit on the training documents alone (data.train_tokenizer), and its cache.

A student with its own, smaller vocabulary than its teacher's (distillation across tokenizers, docs/llm.md) needs a
tokenizer. Trained on the whole corpus, it would have seen the test text: its merges would fit the held-out words,
and bits per byte on the test split would flatter every model that uses it. So kdkit.data.lm splits the corpus by
documents first (split_documents) and only the training documents reach the trainer here.

`bpe` is a GPT-2-style byte-level BPE from the `tokenizers` library: the ByteLevel pre-tokenizer (no prefix space)
and decoder, all 256 bytes in the initial alphabet (any text tokenises, nothing is unknown), and one special token,
EOS, which ends each document and pads. It is wrapped as a transformers PreTrainedTokenizerFast (offsets for the
cross-tokenizer alignment, save_pretrained with the student). Training is deterministic for given texts and
settings.

The cache: one tokenizer.json per (training texts, kind, settings, tokenizers version), written atomically under
`cache_dir`, so the seeds, the baseline, `kdkit eval` and a resumed run all read the very same tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from kdkit.atomic import write_text
from kdkit.errors import DataError

EOS = "<eos>"
FORMAT = 1  # bump when the trainer's recipe changes: old cache files are then never read


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE of at most vocab_size tokens (256 bytes, EOS, merges) trained on `texts`, as a
    PreTrainedTokenizerFast whose eos and pad token is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap(tok)


def wrap(tok):
    """A tokenizers.Tokenizer as the transformers tokenizer kdkit's LM code reads (eos = pad = EOS)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


# kind (data.train_tokenizer.kind) → trainer(texts, vocab_size, min_frequency). A literal dict: one line per kind.
TRAINERS: dict[str, Callable] = {"bpe": train_bpe}


def tokenizer_key(texts: list[str], kind: str, vocab_size: int, min_frequency: int) -> str:
    """The sha256 of what the trained tokenizer depends on: the texts (each with its length, in order), the kind and
    settings, the recipe's FORMAT and the tokenizers version."""
    import tokenizers

    h = hashlib.sha256(f"tokenizer|{FORMAT}|{kind}|{vocab_size}|{min_frequency}|{tokenizers.__version__}".encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def trained_tokenizer(texts: list[str], kind: str, vocab_size: int, min_frequency: int,
                      cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None):
    """The tokenizer TRAINERS[kind] makes from `texts`: read from cache_dir/<kind>-<vocab_size>-<key>.json when
    there, else trained (and, with cache_dir, written there atomically)."""
    if kind not in TRAINERS:
        raise DataError(f"data.train_tokenizer.kind: {kind!r}; expected one of: {', '.join(TRAINERS)}")
    if not any(t.strip() for t in texts):
        raise DataError("data.train_tokenizer: the training documents hold no text to train a tokenizer on")
    say = log or (lambda message: None)
    path = None
    if cache_dir is not None:
        key = tokenizer_key(texts, kind, vocab_size, min_frequency)
        path = Path(cache_dir) / f"{kind}-{vocab_size}-{key[:16]}.json"
        if path.is_file():
            from tokenizers import Tokenizer

            say(f"student tokenizer: {path} (cached)")
            return wrap(Tokenizer.from_file(str(path)))
    tokenizer = TRAINERS[kind](texts, vocab_size, min_frequency)
    chars = sum(len(t) for t in texts)
    say(f"student tokenizer: {kind} of {len(tokenizer)} tokens trained on {len(texts)} training documents "
        f"({chars:,} characters)" + (f", kept in {path}" if path is not None else ""))
    if path is not None:
        write_text(path, tokenizer.backend_tokenizer.to_str())
    return tokenizer
