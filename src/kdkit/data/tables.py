"""Tables (CSV, parquet, .npz arrays) → feature matrix and labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdkit.errors import DataError
from kdkit.registry import suggest


def encode_labels(values: np.ndarray, field: str) -> tuple[np.ndarray, list[str]]:
    """Any label column → int64 ids 0..C-1 in sorted order of the distinct values, and the class names."""
    if values.size == 0:
        raise DataError(f"{field}: the data set is empty")
    classes, ids = np.unique(values, return_inverse=True)
    return ids.astype(np.int64), [str(c) for c in classes]


def load_table(path: str, kind: str, label_column: str, feature_columns: list[str] | None):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path: file {str(p)!r} not found")
    try:
        frame = pd.read_csv(p) if kind == "csv" else pd.read_parquet(p)
    except Exception as exc:  # pandas raises many types; the message is what matters to the user
        raise DataError(f"data.path: could not read {str(p)!r} as {kind}: {exc}".splitlines()[0]) from None
    if len(frame) == 0:
        raise DataError(f"data.path: {str(p)!r} is empty (a header but no rows); expected one example per row")
    columns = [str(c) for c in frame.columns]
    if label_column not in columns:
        raise DataError(
            f"data.label_column: {label_column!r} is not a column of {p.name}{suggest(label_column, columns)}; "
            f"columns: {', '.join(columns)}"
        )
    features = feature_columns or [c for c in columns if c != label_column]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(
            f"data.feature_columns: {', '.join(map(repr, missing))} not in {p.name}; columns: {', '.join(columns)}"
        )
    sub = frame[features]
    non_numeric = [c for c in features if not np.issubdtype(sub[c].dtype, np.number)]
    if non_numeric:
        raise DataError(
            f"data.feature_columns: {', '.join(map(repr, non_numeric))} are not numeric; expected numeric features "
            "(encode categories first, or list only numeric columns)"
        )
    x = sub.to_numpy(dtype=np.float32)
    if np.isnan(x).any():
        raise DataError(f"data.path: {p.name} has missing values in the feature columns; expected none")
    y, names = encode_labels(frame[label_column].to_numpy(), "data.label_column")
    return x, y, names


def load_arrays(path: str):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path: file {str(p)!r} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x" not in keys or "y" not in keys:
                raise DataError(f"data.path: {p.name} holds {keys}; expected arrays named 'x' and 'y'")
            x, y = z["x"].astype(np.float32), z["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.path: could not read {str(p)!r} as .npz: {exc}".splitlines()[0]) from None
    if len(x) != len(y):
        raise DataError(f"data.path: {p.name} has {len(x)} inputs but {len(y)} labels; expected the same count")
    y, names = encode_labels(np.asarray(y), "data.path")
    return x, y, names
