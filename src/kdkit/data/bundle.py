"""What every data source produces: train/val/test data sets (DataBundle), the stratified split with a fixed seed,
normalisation fitted on the training split only, and batches as `kdkit.types.Batch`. The sources themselves, and
build_data, are in kdkit.data.sources."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.errors import DataError
from kdkit.types import Batch


class TensorData(Dataset):
    """In-memory examples; an item is (input, label, position in this data set). A DataLoader reads a whole batch
    at once (`__getitems__`): one indexing of the tensors, not an item per example stacked again."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.labels = x, y

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i], i

    def __getitems__(self, indices: list[int]) -> Batch | list:
        """The examples at `indices` as one Batch, equal to `collate([self[i] for i in indices])` (torch's
        DataLoader calls this with a batch sampler's indices and passes the result to its collate function). A
        subclass that changes `__getitem__` (noise per example, say) gets its items one by one, as it asks for."""
        if type(self).__getitem__ is not TensorData.__getitem__:
            return [self[i] for i in indices]
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batch(self.x[index], self.labels[index].to(torch.long), index)

    def fingerprint(self) -> str:
        h = hashlib.sha256(str(tuple(self.x.shape)).encode())
        h.update(self.x.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


def collate(items: list | Batch) -> Batch:
    """Items (input, label, position) stacked into a Batch; a Batch (a whole batch read at once) as it is."""
    if isinstance(items, Batch):
        return items
    xs, ys, idx = zip(*items)
    return Batch(torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long), torch.as_tensor(idx, dtype=torch.long))


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]  # one example, without the batch dimension (text: the maximum length)
    modality: str = "tensor"  # "tensor" (images, tables) or "text" (token ids)
    truncated: int = 0  # texts cut to max_length
    transfer: int = 0  # unlabelled training examples (a transfer set), after the labelled ones in `train`
    tokenizer: object = None  # text: the tokenizer of the data (the student's)
    _retokenizers: dict = field(default_factory=dict, repr=False)

    def collate(self, items: list) -> Batch:
        return getattr(self.train, "collate", collate)(items)

    def labelled(self) -> DataBundle:
        """This data without the transfer set: what a network trained on labels alone sees (the labelled
        examples come first in `train`, so their positions, and a teacher cache keyed by them, are unchanged)."""
        if not self.transfer:
            return self
        keep = np.arange(len(self.train) - self.transfer)
        return replace(self, train=self.train.subset(keep), transfer=0)

    def retokenizer(self, tokenizer: str, where: str):
        """A kdkit.data.text.Retokenizer from this data's token ids to `tokenizer`'s, or None when `tokenizer` has
        the data's own vocabulary (nothing to do, no extra cost). Built once per tokenizer: every split is
        tokenised again from its raw texts."""
        from kdkit.data.text import Retokenizer, load_tokenizer

        if self.modality != "text":
            raise DataError(f"{where}: a member tokenizer needs text data; the data has inputs {self.input_shape}")
        if tokenizer in self._retokenizers:
            return self._retokenizers[tokenizer]
        target = load_tokenizer(tokenizer, where)
        if target.get_vocab() == self.tokenizer.get_vocab():
            self._retokenizers[tokenizer] = None
            return None
        if target.pad_token_id is None:
            raise DataError(f"{where}: {tokenizer!r} has no padding token; expected one (e.g. [PAD])")
        parts = [d for d in (self.train, self.val, self.test) if d is not None]
        if any(d.texts is None for d in parts):
            raise DataError(f"{where}: the data keeps no raw texts to tokenise again (extra data without texts)")
        texts = [t for d in parts for t in d.texts]
        ids = [i for d in parts for i in d.ids]
        retok = Retokenizer.build(texts, ids, self.tokenizer, target, self.input_shape[0], tokenizer)
        self._retokenizers[tokenizer] = retok
        return retok

    def example(self, n: int = 1) -> torch.Tensor:
        """The first n training inputs as a batch (shape checks, latency)."""
        return self.collate([self.train[i] for i in range(min(n, len(self.train)))]).inputs

    def inputs(self, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split as one (padded) batch: (inputs, labels)."""
        ds = getattr(self, split)
        batch = self.collate([ds[i] for i in range(len(ds))])
        return batch.inputs, batch.labels


def subset_indices(y: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """A stratified random subset of `limit` positions (files are often sorted by class: the first rows would
    hold only a few classes)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and limit >= len(counts[counts > 0]) else None
    keep, _ = train_test_split(np.arange(len(y)), train_size=limit, random_state=seed, stratify=stratify)
    return np.sort(keep)


def split_indices(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Stratified train/val/test positions; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 3 else None  # too few of a class to stratify: plain random split
    rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    if val_fraction <= 0:
        return np.sort(rest), np.array([], dtype=np.int64), np.sort(test)
    rel = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        rest, test_size=rel, random_state=seed, stratify=None if stratify is None else y[rest]
    )
    return np.sort(train), np.sort(val), np.sort(test)


def bundle_from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit: int | None,
) -> DataBundle:
    """Split, fit the normalisation on the training split (per channel for images, per feature for tables)."""
    if limit and limit < len(y):
        keep = subset_indices(y, limit, seed)
        x, y = x[keep], y[keep]
    if len(y) == 0:
        raise DataError("data: the data set is empty; expected at least a few examples per class")
    num_classes = len(names)
    if len(np.unique(y)) < 2:
        raise DataError(f"data: only one class ({names[int(y[0])]!r}) present; expected at least two classes")
    if len(y) < 10:
        raise DataError(f"data: {len(y)} examples; expected at least 10 to make train, validation and test splits")
    tr, va, te = split_indices(y, val_fraction, test_fraction, seed)
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    axes = (0, 2, 3) if x_t.dim() == 4 else tuple(i for i in range(x_t.dim()) if i != 1)
    mean = x_t[tr].mean(dim=axes, keepdim=True)
    std = x_t[tr].std(dim=axes, keepdim=True).clamp_min(1e-6)
    x_t = (x_t - mean) / std
    y_t = torch.from_numpy(y.astype(np.int64))

    def part(ix):
        return TensorData(x_t[ix].contiguous(), y_t[ix].contiguous())

    return DataBundle(part(tr), part(va) if len(va) else None, part(te), num_classes, names, tuple(x_t.shape[1:]))
