"""Images: an ImageFolder layout (one sub-folder per class) read lazily with Pillow, and image decoding helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdkit.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def to_array(image, size: int, grayscale: bool) -> np.ndarray:
    """A PIL image → (C, size, size) float32 in [0, 1]."""
    image = image.convert("L" if grayscale else "RGB").resize((size, size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return arr[None] if grayscale else arr.transpose(2, 0, 1).copy()


def scan_image_folder(root: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """root/<class>/<image> → file paths, int64 labels (classes in sorted order), class names."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"data.path: folder {str(base)!r} not found")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"data.path: {str(base)!r} has no class sub-folders; expected ROOT/<class>/<image files>")
    paths, labels = [], []
    for i, name in enumerate(classes):
        files = sorted(f for f in (base / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DataError(
            f"data.path: no image files under {str(base)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


class ImageFiles(Dataset):
    """Decodes one image per item; normalised with the given per-channel mean and std."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int, grayscale: bool, mean=None, std=None):
        self.paths, self.labels = list(paths), torch.as_tensor(labels)
        self.size, self.grayscale = size, grayscale
        channels = 1 if grayscale else 3
        self.mean = torch.zeros(channels, 1, 1) if mean is None else torch.as_tensor(mean).view(-1, 1, 1)
        self.std = torch.ones(channels, 1, 1) if std is None else torch.as_tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.paths[i]) as im:
                return torch.from_numpy(to_array(im, self.size, self.grayscale))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"data.path: cannot read image {str(self.paths[i])!r}: {exc}") from None

    def __getitem__(self, i: int):
        return (self.load(i) - self.mean) / self.std, self.labels[i], i

    def subset(self, idx: np.ndarray) -> ImageFiles:
        return ImageFiles(
            [self.paths[i] for i in idx], self.labels.numpy()[idx], self.size, self.grayscale, self.mean, self.std
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.size}:{self.grayscale}".encode())
        for p, y in zip(self.paths, self.labels.tolist()):
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}:{y}".encode())
        h.update(self.mean.numpy().tobytes() + self.std.numpy().tobytes())
        return h.hexdigest()
