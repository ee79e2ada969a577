"""Opening a teacher cache folder: its manifest, the keys it was built for, and the files it lists.

Both teacher caches (lm_cache.TopKCache and cross_cache.CrossTopKCache) keep a folder of .npy files and a JSON
manifest written LAST, which names the cache's format, its keys (teacher and data fingerprints, k, kd temperature)
and each file with its size in bytes and sha256. Opening one is the same steps for both: read the manifest, compare
its keys with what the caller expects, then check each file whole and memory-map it. A CacheKind holds what differs
between the two — the name that starts every message, the manifest's file name and format, and how a teacher or
data mismatch is worded — so that each refusal stays one line naming the cache and the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdkit.atomic import sha256_file
from kdkit.errors import DataError


@dataclass(frozen=True)
class CacheKind:
    """One kind of teacher cache folder. name starts every error ("teacher top-k cache"); manifest is the manifest's
    file name and format the value of its "format" field; teacher_words and data_words complete "built from …" when
    the teacher or data fingerprint differs, and data_note is added inside the data line's parentheses."""

    name: str
    manifest: str
    format: str
    teacher_words: str = "another teacher"
    data_words: str = "another data set"
    data_note: str = ""

    def read_manifest(self, path: Path) -> dict:
        """The manifest at `path`, or a one-line DataError: missing (not built, or unfinished), not JSON, or of
        another format."""
        file = path / self.manifest
        if not file.is_file():
            raise DataError(f"{self.name} {path}: no {self.manifest} (not built, or its build did not finish)")
        try:
            manifest = json.loads(file.read_text())
        except ValueError as exc:
            raise DataError(f"{self.name} {path}: {self.manifest} is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != self.format:
            raise DataError(f"{self.name} {path}: {self.manifest} is not a {self.format} manifest")
        return manifest

    def mismatch(
        self, manifest: dict, teacher: str | None, data: str | None, k: int | None, temperature: float | None
    ) -> str:
        """'' when the manifest matches what is expected (None: not checked), else the first difference, one
        phrase."""
        if teacher is not None and manifest.get("teacher") != teacher:
            return f"built from {self.teacher_words} ({manifest.get('teacher')!r}, expected {teacher!r})"
        if data is not None and manifest.get("data") != data:
            return f"built from {self.data_words} ({manifest.get('data')!r}, expected {data!r}{self.data_note})"
        if k is not None and manifest.get("k") != int(k):
            return f"built with k={manifest.get('k')}, expected k={k}"
        if temperature is not None and not np.isclose(float(manifest.get("temperature", float("nan"))), temperature):
            return f"built at kd temperature {manifest.get('temperature')}, expected {temperature:g}"
        return ""

    def matching_manifest(
        self, path: Path, teacher: str | None, data: str | None, k: int | None, temperature: float | None
    ) -> dict:
        """The manifest at `path` when it was built for these keys (None: not checked); else a one-line DataError
        (no manifest, an unreadable one, or the first key that differs, with how to rebuild)."""
        manifest = self.read_manifest(path)
        problem = self.mismatch(manifest, teacher, data, k, temperature)
        if problem:
            raise DataError(f"{self.name} {path}: {problem}; rebuild it with `kdkit cache-teacher`")
        return manifest

    def mismatch_at(
        self, path: Path, teacher: str | None, data: str | None, k: int | None, temperature: float | None
    ) -> str | None:
        """What build_or_load needs to know of the folder: None when it holds no readable manifest (nothing worth
        keeping: build), '' when its manifest matches these keys, else the first difference (see mismatch)."""
        if not (path / self.manifest).is_file():
            return None
        try:
            manifest = self.read_manifest(path)
        except DataError:
            return None
        return self.mismatch(manifest, teacher, data, k, temperature)

    def open_file(self, path: Path, entry: dict, verify: bool, part: str = "") -> np.ndarray:
        """Memory-map (read-only) the file that a manifest entry {"file", "bytes", "sha256"} names in the folder
        `path`, or a one-line DataError when it is missing, of another size than the entry says, or (verify=True)
        of another sha256; `part` (e.g. "shard 3 ") comes before what is wrong."""
        file = path / entry["file"]
        damage = ""
        if not file.is_file():
            damage = f"file {file.name} is missing"
        elif (size := file.stat().st_size) != entry["bytes"]:
            damage = f"file {file.name} has {size} bytes, the manifest says {entry['bytes']} (truncated or altered)"
        elif verify and sha256_file(file) != entry["sha256"]:
            damage = f"file {file.name} has been altered (its sha256 differs from the manifest)"
        if damage:
            raise DataError(f"{self.name} {path}: {part}{damage}; rebuild it")
        return np.load(file, mmap_mode="r")
