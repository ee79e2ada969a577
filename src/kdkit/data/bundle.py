"""From a data section to train/val/test data sets: stratified split with a fixed seed, normalisation fitted on
the training split only, and batches as `kdkit.types.Batch`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.errors import DataError
from kdkit.types import Batch


class TensorData(Dataset):
    """In-memory examples; an item is (input, label, position in this data set)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.labels = x, y

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i], i

    def fingerprint(self) -> str:
        h = hashlib.sha256(str(tuple(self.x.shape)).encode())
        h.update(self.x.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


def collate(items: list) -> Batch:
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


def build_data(
    source: str,
    name: str | None = None,
    path: str | None = None,
    data_files=None,
    label_column: str = "label",
    feature_columns: list[str] | None = None,
    image_column: str | None = None,
    image_size: int = 32,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
    extra_train: list[str] | tuple = (),
    text_column: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 128,
    transfer: str | None = None,
    label_fraction: float = 1.0,
    task: str = "classification",
) -> DataBundle:
    """The flat arguments of the `data` config section → DataBundle (classification; language-model corpora,
    task causal_lm, are built by the language-model flow)."""
    from kdkit.data import builtin, hf, images, tables
    from kdkit.registry import lookup

    if task != "classification":
        raise DataError(f"data.task: {task!r}; build_data makes classification data (causal_lm has its own flow)")

    if source == "text_folder" or (source == "builtin" and name in TEXT_BUILTINS) or (source == "hf" and text_column):
        return _text_bundle(
            transfer,
            label_fraction,
            source,
            name,
            path,
            data_files,
            label_column,
            text_column,
            tokenizer,
            max_length,
            val_fraction,
            test_fraction,
            split_seed,
            limit,
        )
    if transfer or label_fraction < 1:
        field_name = "data.transfer" if transfer else "data.label_fraction"
        raise DataError(
            f"{field_name}: a transfer set of unlabelled examples needs text data (text_folder, builtin bbc_news, "
            f"hf with text_column); source is {source!r}"
        )
    if source == "image_folder":
        if extra_train:
            raise DataError(
                "data.extra_train: works with in-memory sources (builtin, arrays, csv, parquet, hf); "
                "for an image folder, add the images to the class folders instead"
            )
        return _image_folder_bundle(path, image_size, grayscale, val_fraction, test_fraction, split_seed, limit)
    if source == "builtin":
        x, y, names = lookup(builtin.BUILTIN_DATASETS, name, "data.name")()
    elif source == "arrays":
        x, y, names = tables.load_arrays(path)
    elif source in ("csv", "parquet"):
        x, y, names = tables.load_table(path, source, label_column, feature_columns)
    elif source == "hf":
        x, y, names = hf.load_hf(name, data_files, label_column, feature_columns, image_column, image_size, grayscale)
    else:  # the config's Literal makes this unreachable from YAML
        raise DataError(f"data.source: unknown source {source!r}")
    del images
    bundle = bundle_from_arrays(x, y, names, val_fraction, test_fraction, split_seed, limit)
    if extra_train:
        from kdkit.data.extra import append_examples

        bundle.train = append_examples(bundle.train, list(extra_train), bundle.input_shape, bundle.class_names)
    return bundle


TEXT_BUILTINS = {"bbc_news"}


def _text_bundle(
    transfer,
    label_fraction,
    source,
    name,
    path,
    data_files,
    label_column,
    text_column,
    tokenizer,
    max_length,
    val_fraction,
    test_fraction,
    seed,
    limit,
) -> DataBundle:
    from kdkit.data.text import (
        UNLABELLED,
        TextData,
        bbc_news,
        load_tokenizer,
        read_text_folder,
        read_transfer,
        special_ids,
        tokenize,
    )

    if not tokenizer:
        raise DataError("data.tokenizer: text data needs a tokenizer (a folder or hub id, usually the teacher's)")
    if source == "text_folder":
        texts, y, names = read_text_folder(path)
    elif source == "builtin":
        texts, y, names = bbc_news()
    else:
        texts, y, names = _hf_texts(name, data_files, label_column, text_column)
    if limit and limit < len(y):
        keep = subset_indices(y, limit, seed)
        texts, y = [texts[i] for i in keep], y[keep]
    if len(np.unique(y)) < 2:
        raise DataError("data: only one class present; expected at least two classes")
    extra = read_transfer(transfer, text_column) if transfer else []
    tok = load_tokenizer(tokenizer)
    if tok.pad_token_id is None:
        raise DataError(f"data.tokenizer: {tokenizer!r} has no padding token; expected one (e.g. [PAD])")
    ids, cut = tokenize(texts, tok, max_length)
    specials = special_ids(tok)
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
    full = TextData(ids, torch.from_numpy(y.astype(np.int64)), tok.pad_token_id, mask_id, texts, specials)
    tr, va, te = split_indices(y, val_fraction, test_fraction, seed)
    train = full.subset(tr)
    unlabelled = 0
    if label_fraction < 1:  # the labelled share first, the rest unlabelled after it
        n_keep = max(len(names), int(round(label_fraction * len(tr))))
        if n_keep >= len(tr):
            raise DataError(f"data.label_fraction: {label_fraction:g} keeps every one of {len(tr)} training labels")
        keep = subset_indices(y[tr], n_keep, seed)
        rest = np.setdiff1d(np.arange(len(tr)), keep)
        labelled, hidden = train.subset(keep), train.subset(rest)
        hidden.labels = torch.full_like(hidden.labels, UNLABELLED)
        train, unlabelled = labelled.concat(hidden), len(rest)
    if extra:
        extra_ids, extra_cut = tokenize(extra, tok, max_length)
        cut += extra_cut
        more = TextData(
            extra_ids,
            torch.full((len(extra),), UNLABELLED, dtype=torch.long),
            tok.pad_token_id,
            mask_id,
            extra,
            specials,
        )
        train, unlabelled = train.concat(more), unlabelled + len(extra)
    return DataBundle(
        train,
        full.subset(va) if len(va) else None,
        full.subset(te),
        len(names),
        names,
        (max_length,),
        modality="text",
        truncated=cut,
        transfer=unlabelled,
        tokenizer=tok,
    )


def _hf_texts(name, data_files, label_column, text_column):
    from kdkit.data.hf import load_split
    from kdkit.data.tables import encode_labels
    from kdkit.registry import suggest

    split = load_split(name, data_files)
    columns = list(split.column_names)
    for setting, col in (("data.text_column", text_column), ("data.label_column", label_column)):
        if col not in columns:
            raise DataError(f"{setting}: {col!r} not found{suggest(col, columns)}; columns: {', '.join(columns)}")
    y, names = encode_labels(np.asarray(split[label_column]), "data.label_column")
    return [str(t) for t in split[text_column]], y, names


def _image_folder_bundle(path, size, grayscale, val_fraction, test_fraction, seed, limit) -> DataBundle:
    from kdkit.data.images import ImageFiles, scan_image_folder

    paths, y, names = scan_image_folder(path)
    if limit and limit < len(y):
        keep = subset_indices(y, limit, seed)
        paths, y = [paths[i] for i in keep], y[keep]
    if len(np.unique(y)) < 2:
        raise DataError(f"data.path: only one class folder with images under {path!r}; expected at least two")
    tr, va, te = split_indices(y, val_fraction, test_fraction, seed)
    raw = ImageFiles(paths, y, size, grayscale)
    sample = torch.stack([raw.load(int(i)) for i in tr[:256]])
    mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3)).clamp_min(1e-6)
    full = ImageFiles(paths, y, size, grayscale, mean, std)
    return DataBundle(
        full.subset(tr),
        full.subset(va) if len(va) else None,
        full.subset(te),
        len(names),
        names,
        tuple(sample.shape[1:]),
    )
