"""Atomic writes: a temp file in the same folder, fsync, then rename. A crash leaves the old file or the new one.

Imports nothing of kdkit, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) and move tmp_path onto `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode a plain open() would
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Move a fully written folder into place; an existing folder of that name is replaced."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB pieces (checkpoints and caches record it to detect damage)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npy(path: str | Path, array) -> None:
    """np.save into exactly `path` (np.save on a path would append '.npy' to a temp name); use with write_with."""
    import numpy as np

    with open(path, "wb") as fh:
        np.save(fh, array)
