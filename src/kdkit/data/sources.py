"""Classification data sources: one loader per `data.source`, listed in DATA_SOURCES (a literal dict, whose keys are
exactly the values of kdkit.config.DataConfig.source), and build_data, which dispatches through it.

Every loader has one signature, `(DataRequest) -> DataBundle`: it reads its source, then finishes the bundle with
one of three makers below: `array_bundle` (examples in memory: images as arrays, tables), `text_bundle` (texts,
tokenised), `image_folder_bundle` (image files decoded lazily). Which maker runs depends on what the source holds
(builtin bbc_news and hf with a text_column hold texts), never on the source's name outside its own loader.
Language-model corpora (task causal_lm) have their own registry, kdkit.data.lm.CORPUS_SOURCES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdkit.data.bundle import DataBundle, bundle_from_arrays, split_indices, subset_indices
from kdkit.errors import DataError
from kdkit.registry import lookup


@dataclass(frozen=True)
class DataRequest:
    """The flat fields of the `data` config section that the loaders read (meanings: kdkit.config.DataConfig)."""

    source: str
    name: str | None = None
    path: str | None = None
    data_files: Any = None
    label_column: str = "label"
    feature_columns: list[str] | None = None
    image_column: str | None = None
    image_size: int = 32
    grayscale: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    limit: int | None = None
    extra_train: tuple[str, ...] = ()
    text_column: str | None = None
    tokenizer: str | None = None
    max_length: int = 128
    transfer: str | None = None
    label_fraction: float = 1.0


# ---------------------------------------------------------------------------------------------------------------
# One loader per source


def load_builtin(req: DataRequest) -> DataBundle:
    """A data set shipped inside an installed package (kdkit.data.builtin.BUILTIN_DATASETS): arrays or texts."""
    from kdkit.data.builtin import BUILTIN_DATASETS

    inputs, y, names = lookup(BUILTIN_DATASETS, req.name, "data.name")()
    if isinstance(inputs, list):  # a text corpus (bbc_news)
        return text_bundle(inputs, y, names, req)
    return array_bundle(inputs, y, names, req)


def load_arrays(req: DataRequest) -> DataBundle:
    """An .npz file with arrays `x` (inputs) and `y` (labels)."""
    from kdkit.data.tables import load_arrays as read_npz

    return array_bundle(*read_npz(req.path), req)


def load_csv(req: DataRequest) -> DataBundle:
    from kdkit.data.tables import load_table

    return array_bundle(*load_table(req.path, "csv", req.label_column, req.feature_columns), req)


def load_parquet(req: DataRequest) -> DataBundle:
    from kdkit.data.tables import load_table

    return array_bundle(*load_table(req.path, "parquet", req.label_column, req.feature_columns), req)


def load_image_folder(req: DataRequest) -> DataBundle:
    """One sub-folder of images per class, decoded lazily (never all in memory)."""
    _labels_only(req)
    if req.extra_train:
        raise DataError(
            "data.extra_train: works with in-memory sources (builtin, arrays, csv, parquet, hf); "
            "for an image folder, add the images to the class folders instead"
        )
    return image_folder_bundle(req)


def load_text_folder(req: DataRequest) -> DataBundle:
    """One sub-folder of .txt files per class."""
    from kdkit.data.text import read_text_folder

    return text_bundle(*read_text_folder(req.path), req)


def load_hf(req: DataRequest) -> DataBundle:
    """Hugging Face `datasets`: texts when `text_column` is set; otherwise an image column or numeric features."""
    from kdkit.data import hf

    if req.text_column:
        return text_bundle(*_hf_texts(req.name, req.data_files, req.label_column, req.text_column), req)
    x, y, names = hf.load_hf(
        req.name,
        req.data_files,
        req.label_column,
        req.feature_columns,
        req.image_column,
        req.image_size,
        req.grayscale,
    )
    return array_bundle(x, y, names, req)


DATA_SOURCES = {
    "builtin": load_builtin,
    "arrays": load_arrays,
    "csv": load_csv,
    "parquet": load_parquet,
    "image_folder": load_image_folder,
    "text_folder": load_text_folder,
    "hf": load_hf,
}


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
    train_tokenizer: dict | None = None,
    block_chars: int | None = None,
) -> DataBundle:
    """The flat arguments of the `data` config section → DataBundle (classification; language-model corpora,
    task causal_lm, are built by kdkit.data.lm.build_lm_data, which alone reads train_tokenizer and block_chars)."""
    if task != "classification":
        raise DataError(f"data.task: {task!r}; build_data makes classification data (causal_lm has its own flow)")
    if train_tokenizer is not None:
        raise DataError("data.train_tokenizer: trains a language model's tokenizer; expected data.task: causal_lm")
    if block_chars is not None:
        raise DataError(f"data.block_chars: {block_chars} cuts a language model's corpus; expected data.task: "
                        "causal_lm")
    loader = lookup(DATA_SOURCES, source, "data.source")
    request = DataRequest(
        source=source,
        name=name,
        path=path,
        data_files=data_files,
        label_column=label_column,
        feature_columns=feature_columns,
        image_column=image_column,
        image_size=image_size,
        grayscale=grayscale,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        limit=limit,
        extra_train=tuple(extra_train),
        text_column=text_column,
        tokenizer=tokenizer,
        max_length=max_length,
        transfer=transfer,
        label_fraction=label_fraction,
    )
    return loader(request)


# ---------------------------------------------------------------------------------------------------------------
# Finishing a bundle: arrays in memory, texts, image files


def _labels_only(req: DataRequest) -> None:
    """A transfer set (unlabelled examples) exists for text data only."""
    if req.transfer or req.label_fraction < 1:
        field_name = "data.transfer" if req.transfer else "data.label_fraction"
        raise DataError(
            f"{field_name}: a transfer set of unlabelled examples needs text data (text_folder, builtin bbc_news, "
            f"hf with text_column); source is {req.source!r}"
        )


def array_bundle(x: np.ndarray, y: np.ndarray, names: list[str], req: DataRequest) -> DataBundle:
    """Examples in memory → split, normalised bundle, with the extra .npz training examples appended."""
    _labels_only(req)
    bundle = bundle_from_arrays(x, y, names, req.val_fraction, req.test_fraction, req.split_seed, req.limit)
    if req.extra_train:
        from kdkit.data.extra import append_examples

        bundle.train = append_examples(bundle.train, list(req.extra_train), bundle.input_shape, bundle.class_names)
    return bundle


def text_bundle(texts: list[str], y: np.ndarray, names: list[str], req: DataRequest) -> DataBundle:
    """Texts → token ids with the data's tokenizer, split; the labelled share and the transfer set as configured."""
    from kdkit.data.text import UNLABELLED, TextData, load_tokenizer, read_transfer, special_ids, tokenize

    if req.extra_train:
        raise DataError(
            "data.extra_train: .npz examples (already model inputs) work with array data (builtin mnist5k/digits, "
            f"arrays, csv, parquet, hf without text_column); source {req.source!r} holds texts"
        )
    if not req.tokenizer:
        raise DataError("data.tokenizer: text data needs a tokenizer (a folder or hub id, usually the teacher's)")
    seed = req.split_seed
    if req.limit and req.limit < len(y):
        keep = subset_indices(y, req.limit, seed)
        texts, y = [texts[i] for i in keep], y[keep]
    if len(np.unique(y)) < 2:
        raise DataError("data: only one class present; expected at least two classes")
    extra = read_transfer(req.transfer, req.text_column) if req.transfer else []
    tok = load_tokenizer(req.tokenizer)
    if tok.pad_token_id is None:
        raise DataError(f"data.tokenizer: {req.tokenizer!r} has no padding token; expected one (e.g. [PAD])")
    ids, cut = tokenize(texts, tok, req.max_length)
    specials = special_ids(tok)
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
    full = TextData(ids, torch.from_numpy(y.astype(np.int64)), tok.pad_token_id, mask_id, texts, specials)
    tr, va, te = split_indices(y, req.val_fraction, req.test_fraction, seed)
    train = full.subset(tr)
    unlabelled = 0
    if req.label_fraction < 1:  # the labelled share first, the rest unlabelled after it
        n_keep = max(len(names), int(round(req.label_fraction * len(tr))))
        if n_keep >= len(tr):
            raise DataError(f"data.label_fraction: {req.label_fraction:g} keeps every one of {len(tr)} training labels")
        keep = subset_indices(y[tr], n_keep, seed)
        rest = np.setdiff1d(np.arange(len(tr)), keep)
        labelled, hidden = train.subset(keep), train.subset(rest)
        hidden.labels = torch.full_like(hidden.labels, UNLABELLED)
        train, unlabelled = labelled.concat(hidden), len(rest)
    if extra:
        extra_ids, extra_cut = tokenize(extra, tok, req.max_length)
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
        (req.max_length,),
        modality="text",
        truncated=cut,
        transfer=unlabelled,
        tokenizer=tok,
    )


def image_folder_bundle(req: DataRequest) -> DataBundle:
    """Image files split by class; per-channel normalisation from (up to 256) training images."""
    from kdkit.data.images import ImageFiles, scan_image_folder

    path, seed = req.path, req.split_seed
    paths, y, names = scan_image_folder(path)
    if req.limit and req.limit < len(y):
        keep = subset_indices(y, req.limit, seed)
        paths, y = [paths[i] for i in keep], y[keep]
    if len(np.unique(y)) < 2:
        raise DataError(f"data.path: only one class folder with images under {path!r}; expected at least two")
    tr, va, te = split_indices(y, req.val_fraction, req.test_fraction, seed)
    raw = ImageFiles(paths, y, req.image_size, req.grayscale)
    sample = torch.stack([raw.load(int(i)) for i in tr[:256]])
    mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3)).clamp_min(1e-6)
    full = ImageFiles(paths, y, req.image_size, req.grayscale, mean, std)
    return DataBundle(
        full.subset(tr),
        full.subset(va) if len(va) else None,
        full.subset(te),
        len(names),
        names,
        tuple(sample.shape[1:]),
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
