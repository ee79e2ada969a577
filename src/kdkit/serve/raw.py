"""Raw inputs of /predict: images (PNG or JPEG, as base64 strings in JSON or as files of a multipart/form-data upload)
for image students, texts (JSON strings) for text students, turned into model inputs by the preprocessing recorded
with the student (RUN_DIR/student/preprocess.json, see kdkit.data.preprocess), so exactly as in training.

A run trained before preprocess.json was written gets its description rebuilt from its config.yaml when the run's
data can be rebuilt here (kdkit.export.run_data); otherwise raw inputs are refused with 422 no_preprocessing, and
tensors are served as before. Nothing is written.

Bad raw inputs answer 4xx with one line and the server goes on:
    413 image_too_large     an image (or a request's images together) over MAX_PIXELS pixels
    422 bad_image           not base64, not a PNG/JPEG, a truncated file, a mode that cannot be converted (16-bit),
                            the wrong size for a student whose training images were never resized
    422 bad_text            not a string, or an empty (or whitespace-only) string
    422 wrong_input_kind    images for a text student, texts for an image student
    422 no_preprocessing    raw inputs for a student whose preprocessing is unknown (tables, or an old run whose
                            data is gone)
    400 bad_multipart       a multipart body that cannot be parsed
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message

import numpy as np

from kdkit.data.preprocess import describe, load_preprocess, preprocessor
from kdkit.errors import DataError, KdkitError
from kdkit.serve.errors import ApiError

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # decoded pixels per request, all images together (a 1 MiB PNG can hold far more)
RAW_FIELDS = {"image": "images", "text": "texts"}  # the kind of student → the JSON field of its raw inputs
TEXT_FORM_FIELDS = ("text", "texts")


@dataclass
class RawInputs:
    """What a student takes besides tensors: kind "image" or "text" with the function that prepares one (image) or a
    batch (texts); kind None with the reason when raw inputs are refused."""

    kind: str | None
    prepare: Callable | None = None
    why_not: str = ""
    description: dict | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def accepts(self) -> list[str]:
        """The request fields this student takes."""
        return ["inputs"] + ([RAW_FIELDS[self.kind]] if self.kind in RAW_FIELDS else [])

    def require(self, given: str) -> None:
        """An ApiError unless this student takes raw inputs of field `given` ("images" or "texts")."""
        if self.kind is None:
            raise ApiError(
                422, "no_preprocessing",
                f"{given}: this student takes preprocessed tensors only ({self.why_not}); send {{\"inputs\": [...]}}",
            )  # fmt: skip
        want = RAW_FIELDS[self.kind]
        if given != want:
            what = "images" if self.kind == "image" else "texts"
            raise ApiError(
                422, "wrong_input_kind",
                f"{given}: this student takes {what}, not {given}; send {{\"{want}\": [...]}} or {{\"inputs\": [...]}}",
            )  # fmt: skip

    def images(self, blobs: list[bytes], names: list[str]) -> np.ndarray:
        """Encoded images → (B, C, H, W) float32; names[i] says where blob i came from (for error messages)."""
        self.require("images")
        decoded = [_open_image(blob, name) for blob, name in zip(blobs, names)]
        total = sum(im.width * im.height for im in decoded)
        if total > MAX_PIXELS:
            raise ApiError(413, "image_too_large", f"images: {total:,} pixels in all; the limit is {MAX_PIXELS:,}")
        return np.stack([_decoded(image, name, self.prepare) for image, name in zip(decoded, names)])

    def texts(self, texts: list, names: list[str]) -> np.ndarray:
        """Texts → (B, max_length) token ids as float32 (the backends take float32; ids below 2**24 are exact)."""
        self.require("texts")
        for text, name in zip(texts, names):
            if not isinstance(text, str):
                raise ApiError(422, "bad_text", f"{name}: {type(text).__name__}; expected a string")
            if not text.strip():
                raise ApiError(422, "bad_text", f"{name}: empty string; expected some text")
        with self._lock:  # a fast tokenizer's truncation settings are shared state: one call at a time
            ids = self.prepare(texts)
        return ids.astype(np.float32)


def raw_inputs_for(run, log: Callable[[str], None]) -> RawInputs:
    """The raw inputs the run's student takes: from RUN_DIR/student/preprocess.json, or rebuilt from the config."""
    folder = run.run_dir / "student"
    try:
        description, tokenizer = load_preprocess(folder), None
        if description is None:
            description, tokenizer = _rebuilt(run)
            log(f"serve: no student/preprocess.json (a run from before it was recorded); {description['kind']} "
                "preprocessing rebuilt from config.yaml")  # fmt: skip
        prepare = preprocessor(description, folder, tokenizer)
    except (KdkitError, ImportError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log(f"serve: raw inputs (images, texts) are off: {reason}")
        return RawInputs(None, why_not=f"its preprocessing is unknown: {reason}")
    if [int(d) for d in description["input_shape"]] != list(run.in_shape):
        reason = f"preprocessing gives inputs {description['input_shape']}, the student takes {list(run.in_shape)}"
        log(f"serve: raw inputs (images, texts) are off: {reason}")
        return RawInputs(None, why_not=reason)
    if prepare is None:
        return RawInputs(None, why_not=description.get("reason", "no raw form is known"), description=description)
    return RawInputs(description["kind"], prepare, description=description)


def _rebuilt(run) -> tuple[dict, object]:
    from kdkit.export.run import run_data

    data = run_data(run)
    return describe(run.cfg.data.model_dump(), data), data.tokenizer


def _open_image(blob: bytes, name: str):
    """A PNG or JPEG, its header read (size known, pixels not yet decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ApiError(422, "bad_image", f"{name}: not a PNG or JPEG image ({len(blob)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", f"{name}: over {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ApiError(422, "bad_image", f"{name}: cannot read the image ({_line(exc)})") from None
    if image.width * image.height > MAX_PIXELS:
        size = f"{image.width}×{image.height}"
        raise ApiError(413, "image_too_large", f"{name}: {size} pixels; the limit is {MAX_PIXELS:,}")
    return image


def _decoded(image, name: str, prepare) -> np.ndarray:
    try:
        image.load()
        return prepare(image)
    except DataError as exc:
        raise ApiError(422, "bad_image", f"{name}: {_line(exc)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt pixel data
        raise ApiError(422, "bad_image", f"{name}: cannot decode the image ({_line(exc)})") from None


def decode_base64(item, name: str) -> bytes:
    """A base64 string (optionally a data URL, data:image/png;base64,...) → bytes."""
    if not isinstance(item, str):
        raise ApiError(422, "bad_image", f"{name}: {type(item).__name__}; expected a base64 string of a PNG or JPEG")
    if item.startswith("data:"):
        item = item.partition(",")[2]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        message = f"{name}: not valid base64; expected a base64 string of a PNG or JPEG"
        raise ApiError(422, "bad_image", message) from None


def multipart_fields(body: bytes, content_type: str) -> tuple[list[bytes], list[str], list[str], list[str]]:
    """A multipart/form-data body (RFC 7578) → (files, their names, texts, their names). Every file part is an
    image; a plain field named "text" or "texts" is a text; any other plain field is refused."""
    boundary = _param("content-type", content_type, "boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary in Content-Type")
    # Every delimiter is CRLF "--" boundary; the first may open the body without the CRLF.
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise ApiError(400, "bad_multipart", "multipart body without parts or without its closing boundary")
    files, file_names, texts, text_names = [], [], [], []
    for i, piece in enumerate(pieces[1:-1]):
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not head.startswith(b"\r\n") or not sep:
            raise ApiError(400, "bad_multipart", f"multipart part {i}: no headers followed by a blank line")
        headers = {}
        for line in head[2:].decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = _param("content-disposition", disposition, "name") or f"part {i}"
        filename = _param("content-disposition", disposition, "filename")
        if filename is not None:
            files.append(content)
            file_names.append(f"file {filename!r}")
        elif name in TEXT_FORM_FIELDS:
            texts.append(content.decode("utf-8", "replace"))
            text_names.append(f"field {name!r} #{len(texts) - 1}")
        else:
            raise ApiError(
                422, "bad_input", f"multipart field {name!r}: expected image files, or fields named text"
            )
    if files and texts:
        raise ApiError(422, "bad_input", "multipart: both image files and text fields; send one kind per request")
    if not files and not texts:
        raise ApiError(422, "bad_input", "multipart: no image files and no text fields")
    return files, file_names, texts, text_names


def _param(header: str, value: str, key: str) -> str | None:
    message = Message()
    message[header] = value
    found = message.get_param(key, header=header)
    if isinstance(found, tuple):  # RFC 2231 encoded
        found = found[2]
    return None if found is None else str(found)


def _line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
