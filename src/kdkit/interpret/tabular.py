"""Tables in, numbers out: reading a table, splitting it, and a fitted encoder that is saved as JSON.

The encoder works in two steps so that synthetic points can be drawn between them:
  frame → codes:   numbers (N, P) float64 with missing values imputed; categories (N, Q) int64 level codes
  codes → matrix:  (N, D) float64, numbers first, then one 0/1 column per level (onehot) or one code column
                   (ordinal), in the order of `feature_names`.
Everything needed to repeat the encoding at prediction time (columns, kinds, imputed values, levels, ranges) is in
encoder.json; `TabularEncoder.from_json` reads it back. A category never seen in training goes to an "other"
bucket (all one-hot columns 0; ordinal code = number of levels) or is an error, as the config says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import ConfigError, DataError
from kdkit.registry import lookup, suggest

MISSING_LEVEL = "(missing)"


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_frame(data) -> Any:
    """The whole table of a `TabularDataConfig` as a pandas DataFrame (target column included)."""
    frame = lookup(FRAME_SOURCES, data.source, "data.source")(data)
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _file(data) -> Path:
    path = Path(data.path)
    if not path.is_file():
        raise DataError(f"data.path: file {str(path)!r} not found")
    return path


def _pandas_frame(data, reader: str):
    import pandas as pd

    path = _file(data)
    try:
        return getattr(pd, reader)(path)
    except Exception as exc:  # pandas raises many types; the message is what the user needs
        raise DataError(f"data.path: could not read {str(path)!r} as {data.source}: {exc}".splitlines()[0]) from None


def _builtin_frame(name: str):
    """A scikit-learn table as a DataFrame. digits comes from kdkit.data's built-in loader (the one definition of
    that data set), as 64 pixel columns of 0..16 named as scikit-learn names them."""
    import pandas as pd
    import sklearn.datasets as skd

    if name == "digits":
        from kdkit.data.builtin import BUILTIN_DATASETS

        images, labels, _ = BUILTIN_DATASETS["digits"]()  # (N, 1, 8, 8) in [0, 1]: the 0..16 counts / 16, exact
        height, width = images.shape[-2:]
        pixels = np.round(images.reshape(len(images), -1).astype(np.float64) * 16.0)
        frame = pd.DataFrame(pixels, columns=[f"pixel_{r}_{c}" for r in range(height) for c in range(width)])
        frame["target"] = labels  # the digits' names are the digits already
        return frame
    loader = {"breast_cancer": skd.load_breast_cancer, "wine": skd.load_wine, "iris": skd.load_iris}[name]
    bunch = loader(as_frame=True)
    frame = bunch.frame.copy()
    # class names read better in rules than 0/1/2
    frame["target"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    return frame


def _hf_frame(name: str, data_files, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError("data.source: hf needs the `datasets` package (pip install 'kdkit[hf]')") from None
    try:
        ds = datasets.load_dataset(name, data_files=data_files, split=split)
    except Exception as exc:
        raise DataError(f"data.name: could not load {name!r} split {split!r}: {exc}".splitlines()[0]) from None
    frame = ds.to_pandas()
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _arrays_frame(path: Path):
    import pandas as pd

    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"data.path: {path.name} holds {list(z.keys())}; expected arrays named 'x' and 'y'")
            x, y = np.asarray(z["x"], dtype=np.float64), np.asarray(z["y"])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.path: could not read {str(path)!r} as .npz: {exc}".splitlines()[0]) from None
    x = x.reshape(len(x), -1)
    if len(x) != len(y):
        raise DataError(f"data.path: {path.name} has {len(x)} inputs but {len(y)} labels; expected the same count")
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])])
    frame["target"] = y
    return frame


# data.source → the table as a DataFrame (keys: interpret.config.TabularDataConfig.source, checked by a test)
FRAME_SOURCES = {
    "builtin": lambda data: _builtin_frame(data.name),
    "csv": lambda data: _pandas_frame(data, "read_csv"),
    "parquet": lambda data: _pandas_frame(data, "read_parquet"),
    "hf": lambda data: _hf_frame(data.name, data.data_files, data.split),
    "arrays": lambda data: _arrays_frame(_file(data)),
}


# ---------------------------------------------------------------------------------------------------------------
# Columns and split


def select_columns(frame, data) -> tuple[list[str], list[str], list[str]]:
    """(features, numeric, categorical) column names; unknown names are an error that lists the columns found."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    named = {"data.target": [data.target]}
    for field_name in ("features", "categorical", "numeric"):
        named[f"data.{field_name}"] = list(getattr(data, field_name) or [])
    problems = []
    for where, names in named.items():
        unknown = [n for n in names if n not in columns]
        if unknown:
            hints = "".join(suggest(n, columns) for n in unknown[:1])
            problems.append(f"{where}: unknown column(s) {', '.join(map(repr, unknown))}{hints}")
    if problems:
        found = ", ".join(columns)
        if len(problems) == 1:
            raise DataError(f"{problems[0]}; columns found: {found}")
        raise DataError(f"{len(problems)} unknown columns; columns found: {found}", details=problems)
    features = list(data.features) if data.features else [c for c in columns if c != data.target]
    if data.target in features:
        raise ConfigError(f"data.features: lists the target {data.target!r}; a feature cannot be the target")
    if not features:
        raise DataError(f"data: no feature columns; the table has only the target {data.target!r}")
    extra = [c for c in list(data.categorical or []) + list(data.numeric or []) if c not in features]
    if extra:
        raise ConfigError(f"data: {', '.join(map(repr, extra))} not among data.features; list them there too")
    categorical_set = set(data.categorical or [])
    numeric_set = set(data.numeric or [])
    numeric, categorical = [], []
    for c in features:
        col = frame[c]
        is_number = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if c in numeric_set or (is_number and c not in categorical_set):
            numeric.append(c)
        else:
            categorical.append(c)
    return features, numeric, categorical


def encode_target(frame, target: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(int64 ids 0..C-1, class names, mask of the rows kept). Rows with a missing target are dropped."""
    values = frame[target]
    keep = ~values.isna().to_numpy()
    kept = values[keep].to_numpy()
    if kept.size == 0:
        raise DataError(f"data.target: {target!r} has no values; expected one class label per row")
    try:
        classes, ids = np.unique(kept, return_inverse=True)
    except TypeError:  # mixed types (numbers and text): compare them as text
        classes, ids = np.unique(kept.astype(str), return_inverse=True)
    if len(classes) < 2:
        raise DataError(
            f"data.target: {target!r} has one class ({classes[0]!r} in all {kept.size} rows); a classifier needs at "
            "least two"
        )
    return ids.astype(np.int64), [str(c) for c in classes], keep


def split_rows(y: np.ndarray, test_fraction: float, seed: int, limit: int | None = None):
    """(train positions, test positions): stratified when every class has at least two rows."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(y))
    stratify_ok = np.bincount(y).min() >= 2
    if limit is not None and limit < len(y):
        positions, _ = train_test_split(
            positions, train_size=limit, random_state=seed, stratify=y if stratify_ok else None
        )
        stratify_ok = np.bincount(y[positions], minlength=y.max() + 1).min() >= 2
    train, test = train_test_split(
        positions, test_size=test_fraction, random_state=seed, stratify=y[positions] if stratify_ok else None
    )
    if len(np.unique(y[train])) < 2:
        raise DataError("data: the training split holds one class only; use more rows or a larger split")
    return np.sort(train), np.sort(test)


# ---------------------------------------------------------------------------------------------------------------
# The encoder


@dataclass
class NumericColumn:
    name: str
    fill: float  # imputed value for missing entries
    low: float  # training range
    high: float
    std: float
    integer: bool  # every training value is a whole number: synthetic values are rounded
    missing: int = 0  # missing values seen in training (imputed)


@dataclass
class CategoricalColumn:
    name: str
    levels: list[str]  # sorted; MISSING_LEVEL last when missing values were seen
    counts: list[int]  # training rows per level (synthetic points draw levels in these proportions)


@dataclass
class TabularEncoder:
    """A fitted table encoder; see the module docstring. Build with `TabularEncoder.fit`."""

    target: str
    class_names: list[str]
    encoding: str
    unseen_category: str
    numeric: list[NumericColumn] = field(default_factory=list)
    categorical: list[CategoricalColumn] = field(default_factory=list)

    # -- fitting --------------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        frame,
        target: str,
        class_names: list[str],
        numeric: list[str],
        categorical: list[str],
        encoding: str = "onehot",
        impute: str = "median",
        unseen_category: str = "other",
        max_levels: int = 50,
    ) -> TabularEncoder:
        """Learn imputation values, ranges and levels from `frame` (the training rows only)."""
        enc = cls(target, list(class_names), encoding, unseen_category)
        for name in numeric:
            values = _numbers(frame[name], name)
            seen = values[~np.isnan(values)]
            if seen.size == 0:
                raise DataError(f"data: column {name!r} has no values in the training split (all missing)")
            fill = float(np.median(seen) if impute == "median" else np.mean(seen))
            enc.numeric.append(
                NumericColumn(
                    name,
                    fill,
                    float(seen.min()),
                    float(seen.max()),
                    float(seen.std()),
                    bool(np.all(seen == np.round(seen))),
                    int(np.isnan(values).sum()),
                )
            )
        for name in categorical:
            values = _categories(frame[name], name)
            levels, counts = np.unique(
                np.array([MISSING_LEVEL if v is None else v for v in values], dtype=object), return_counts=True
            )
            order = sorted(range(len(levels)), key=lambda i: (levels[i] == MISSING_LEVEL, levels[i]))
            if len(levels) > max_levels:
                examples = ", ".join(repr(levels[i]) for i in order[:3])
                raise DataError(
                    f"data: column {name!r} has {len(levels)} distinct non-numeric values (more than "
                    f"data.max_levels={max_levels}; e.g. {examples}): the encoder cannot read it as a category "
                    "(free text or an id?); drop it from data.features, list it in data.numeric if it holds numbers, "
                    "or raise data.max_levels"
                )
            enc.categorical.append(
                CategoricalColumn(name, [str(levels[i]) for i in order], [int(counts[i]) for i in order])
            )
        return enc

    # -- names ------------------------------------------------------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        """The raw feature columns this encoder reads (numbers first, then categories)."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded matrix's columns: `col` for numbers and ordinal codes, `col=level` for one-hot."""
        names = [c.name for c in self.numeric]
        for c in self.categorical:
            names += [f"{c.name}={lv}" for lv in c.levels] if self.encoding == "onehot" else [c.name]
        return names

    def describe_feature(self, index: int) -> tuple[str, str, Any]:
        """(kind, column, level or levels) of encoded column `index`: ("numeric", col, None), ("onehot", col,
        level) or ("ordinal", col, levels)."""
        if index < len(self.numeric):
            return "numeric", self.numeric[index].name, None
        i = index - len(self.numeric)
        for c in self.categorical:
            width = len(c.levels) if self.encoding == "onehot" else 1
            if i < width:
                return ("onehot", c.name, c.levels[i]) if self.encoding == "onehot" else ("ordinal", c.name, c.levels)
            i -= width
        raise IndexError(index)

    # -- frame → codes → matrix ----------------------------------------------------------------------------------

    def codes(self, frame) -> tuple[np.ndarray, np.ndarray]:
        """(numbers (N, P) float64 with missing values imputed, category codes (N, Q) int64; unseen → len(levels))."""
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"data: the table lacks column(s) {', '.join(map(repr, missing))} that the encoder was fit on; "
                f"columns found: {', '.join(map(str, frame.columns))}"
            )
        n = len(frame)
        num = np.empty((n, len(self.numeric)), dtype=np.float64)
        for j, c in enumerate(self.numeric):
            values = _numbers(frame[c.name], c.name)
            num[:, j] = np.where(np.isnan(values), c.fill, values)
        cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            index = {lv: k for k, lv in enumerate(c.levels)}
            values = [MISSING_LEVEL if v is None else v for v in _categories(frame[c.name], c.name)]
            codes = np.array([index.get(v, len(c.levels)) for v in values], dtype=np.int64)
            unseen = codes == len(c.levels)
            if unseen.any() and self.unseen_category == "error":
                shown = sorted({values[i] for i in np.flatnonzero(unseen)})[:5]
                raise DataError(
                    f"data: column {c.name!r} has categories never seen in training: {', '.join(map(repr, shown))}; "
                    f"known: {', '.join(map(repr, c.levels))} (set data.unseen_category: other to bucket them)"
                )
            cat[:, j] = codes
        return num, cat

    def matrix(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Codes → the encoded (N, D) float64 matrix the teacher and the student read."""
        parts = [np.asarray(num, dtype=np.float64).reshape(len(num), -1)]
        for j, c in enumerate(self.categorical):
            codes = cat[:, j]
            if self.encoding == "onehot":
                parts.append((codes[:, None] == np.arange(len(c.levels))[None, :]).astype(np.float64))
            else:
                parts.append(codes[:, None].astype(np.float64))
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(num), 0))

    def transform(self, frame) -> np.ndarray:
        """A DataFrame with the feature columns → the encoded matrix."""
        return self.matrix(*self.codes(frame))

    def labels(self, frame) -> np.ndarray:
        """The target column → class ids, in the order of class_names; an unknown class is an error."""
        index = {name: k for k, name in enumerate(self.class_names)}
        values = [str(v) for v in frame[self.target].to_numpy()]
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise DataError(f"data.target: classes not seen in training: {', '.join(map(repr, unknown[:5]))}")
        return np.array([index[v] for v in values], dtype=np.int64)

    def frame(self, num: np.ndarray, cat: np.ndarray):
        """Codes → a DataFrame of raw feature values (for teachers that read raw columns). The missing level and the
        other bucket become None."""
        import pandas as pd

        out = {c.name: num[:, j] for j, c in enumerate(self.numeric)}
        for j, c in enumerate(self.categorical):
            levels = np.array(c.levels + [None], dtype=object)
            values = levels[cat[:, j]]
            values[values == MISSING_LEVEL] = None
            out[c.name] = values
        return pd.DataFrame(out, columns=self.columns)

    # -- saving ----------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": "kdkit.tabular_encoder/1",
            "target": self.target,
            "class_names": self.class_names,
            "encoding": self.encoding,
            "unseen_category": self.unseen_category,
            "numeric": [asdict(c) for c in self.numeric],
            "categorical": [asdict(c) for c in self.categorical],
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_json(cls, data: dict) -> TabularEncoder:
        if not isinstance(data, dict) or data.get("format") != "kdkit.tabular_encoder/1":
            raise DataError("encoder.json: not a kdkit tabular encoder (format kdkit.tabular_encoder/1)")
        return cls(
            data["target"],
            list(data["class_names"]),
            data["encoding"],
            data["unseen_category"],
            [NumericColumn(**c) for c in data["numeric"]],
            [CategoricalColumn(**c) for c in data["categorical"]],
        )


def _numbers(col, name: str) -> np.ndarray:
    """A column as float64 with NaN for missing; text that is not a number, or infinity, is an error."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col):
        return col.astype(np.float64).to_numpy()
    parsed = pd.to_numeric(col, errors="coerce")
    bad = parsed.isna() & ~col.isna()
    if bad.any():
        shown = ", ".join(repr(v) for v in col[bad].unique()[:3])
        raise DataError(
            f"data: column {name!r} is read as numbers but holds values that are not numbers ({shown}); clean "
            "them, or list the column in data.categorical"
        )
    values = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(values).any():
        raise DataError(f"data: column {name!r} holds infinite values; expected finite numbers or missing values")
    return values


def _categories(col, name: str) -> list[str | None]:
    """A column as text levels (None for missing); values the encoder cannot read (lists, dicts, arrays) fail."""
    import pandas as pd

    out: list[str | None] = []
    for v in col.to_numpy(dtype=object):
        if isinstance(v, (list, dict, tuple, set, np.ndarray, bytes, bytearray)):
            raise DataError(
                f"data: column {name!r} holds {type(v).__name__} values; the encoder reads numbers and categories "
                "only (drop the column from data.features, or flatten it first)"
            )
        out.append(None if v is None or pd.isna(v) else str(v))
    return out
