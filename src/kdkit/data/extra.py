"""Extra training examples stored as .npz files (x: model inputs, already normalised; y: class ids), such as the
inputs on which a served student disagreed with its teacher (kdkit serve --shadow-rate writes them). They are
appended to the training split, never to validation or test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdkit.errors import DataError


def load_npz_examples(path: str | Path, where: str = "data.extra_train") -> tuple[np.ndarray, np.ndarray, list | None]:
    """(x, y, class names or None) from one .npz file or every .npz in a folder (sorted by name)."""
    p = Path(path)
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not p.exists():
        raise DataError(f"{where}: {str(p)!r} not found")
    xs, ys, names = [], [], None
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"{where}: {f.name} holds {list(z.keys())}; expected arrays 'x' and 'y'")
                xs.append(z["x"].astype(np.float32))
                ys.append(z["y"].astype(np.int64))
                if "class_names" in z:
                    names = [str(c) for c in z["class_names"]]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{where}: could not read {str(f)!r} as .npz: {exc}".splitlines()[0]) from None
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64), names
    return np.concatenate(xs), np.concatenate(ys), names


def append_examples(train, paths: list[str], input_shape: tuple, class_names: list[str]):
    """The training TensorData with the extra examples appended (shapes and classes checked)."""
    from kdkit.data.bundle import TensorData

    xs, ys = [train.x], [train.labels]
    for path in paths:
        x, y, names = load_npz_examples(path)
        if len(y) == 0:
            continue
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"data.extra_train: {path} has inputs of shape {tuple(x.shape[1:])}; the data has {tuple(input_shape)}"
            )
        if names is not None and names != list(class_names):
            raise DataError(f"data.extra_train: {path} was labelled with classes {names}; the data has {class_names}")
        if y.min() < 0 or y.max() >= len(class_names):
            raise DataError(f"data.extra_train: {path} has class ids outside 0..{len(class_names) - 1}")
        xs.append(torch.from_numpy(x))
        ys.append(torch.from_numpy(y))
    return TensorData(torch.cat(xs).contiguous(), torch.cat(ys).contiguous())
