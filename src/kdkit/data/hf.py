"""Hugging Face `datasets`: a dataset name (hub or local script) or a builder (csv/json/parquet) with data_files.

Offline machines load local files; a hub name without network fails with a clear message.
"""

from __future__ import annotations

import numpy as np

from kdkit.data.images import to_array
from kdkit.data.tables import encode_labels
from kdkit.errors import DataError
from kdkit.registry import suggest


def load_split(name: str, data_files):
    """The first split (train if present) of `datasets.load_dataset(name, data_files=...)`, with clear errors."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source: 'hf' needs the `datasets` package (pip install 'kdkit[hf]')") from None
    try:
        loaded = datasets.load_dataset(name, data_files=data_files)
    except FileNotFoundError as exc:
        raise DataError(f"data.data_files: {exc}".splitlines()[0]) from None
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"data.name: could not load {name!r} with datasets ({text}); offline, point data.name at a builder "
            "(csv, json, parquet) and data.data_files at local files"
        ) from None
    split = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    if len(split) == 0:
        raise DataError(f"data.name: {name!r} has no rows")
    return split


def load_hf(
    name: str,
    data_files,
    label_column: str,
    feature_columns: list[str] | None,
    image_column: str | None,
    image_size: int,
    grayscale: bool,
):
    split = load_split(name, data_files)
    columns = list(split.column_names)
    if label_column not in columns:
        raise DataError(
            f"data.label_column: {label_column!r} not found{suggest(label_column, columns)}; "
            f"columns: {', '.join(columns)}"
        )
    y, names = encode_labels(np.asarray(split[label_column]), "data.label_column")
    feature = split.features.get(label_column)
    if hasattr(feature, "names") and feature.names and len(feature.names) >= len(names):
        names = [feature.names[int(v)] for v in np.unique(np.asarray(split[label_column]))]
    if image_column:
        if image_column not in columns:
            raise DataError(
                f"data.image_column: {image_column!r} not found{suggest(image_column, columns)}; "
                f"columns: {', '.join(columns)}"
            )
        x = np.stack([to_array(im, image_size, grayscale) for im in split[image_column]])
        return x, y, names
    features = feature_columns or [c for c in columns if c != label_column]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(
            f"data.feature_columns: {', '.join(map(repr, missing))} not found; columns: {', '.join(columns)}"
        )
    try:
        x = np.stack([np.asarray(split[c], dtype=np.float32) for c in features], axis=1)
    except (TypeError, ValueError):
        raise DataError(
            f"data.feature_columns: {features} are not all numeric; expected numeric feature columns"
        ) from None
    return x, y, names
