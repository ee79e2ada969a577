"""Teacher outputs computed once per training example, stored on disk, memory-mapped and reused every epoch.

The cache is keyed by a hash of the teacher's weights (and how it is run) and of the data set, so a changed
teacher or data set gets a new cache instead of a stale one. Files: <key>.npy (float32 (N, C) logits, or
(N, K, C) for K augmented views per example) and <key>.json (what was hashed, shapes); both written atomically.
With views, the augmentation of view k of example i is a pure function of (augmentation, i, k)
(kdkit.data.augment), so training replays exactly the inputs whose teacher outputs were stored.
The data layer does not know what a teacher is:
it takes a function inputs → logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdkit.atomic import save_npy, sha256_file, write_json, write_with
from kdkit.data.bundle import collate
from kdkit.errors import DataError
from kdkit.types import Batch, ModelOutputs


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDKIT_CACHE_DIR") or Path.home() / ".cache" / "kdkit") / "teacher_outputs"


def cache_key(teacher_fingerprint: str, data_fingerprint: str) -> str:
    return hashlib.sha256(f"{teacher_fingerprint}|{data_fingerprint}".encode()).hexdigest()[:32]


class TeacherCache:
    """Maps a batch to the teacher's stored outputs by the examples' positions (Batch.index)."""

    def __init__(self, logits: np.ndarray, path: Path | None = None):
        self.logits = logits  # (N, C) float32, usually a read-only memory map
        self.path = path

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def views(self) -> int:
        """K stored augmented views per example, or 0 for plain (un-augmented) outputs."""
        return int(self.logits.shape[1]) if self.logits.ndim == 3 else 0

    def __call__(self, batch: Batch) -> ModelOutputs:
        idx = batch.index.cpu().numpy()
        if self.views:
            if batch.view is None:
                raise DataError("teacher cache: stored views need batches augmented with the same views")
            rows = torch.from_numpy(np.ascontiguousarray(self.logits[idx, batch.view.cpu().numpy()]))
        else:
            rows = torch.from_numpy(np.ascontiguousarray(self.logits[idx]))
        return ModelOutputs(logits=rows.to(batch.inputs.device))

    @classmethod
    def build_or_load(
        cls,
        dataset: Dataset,
        forward: Callable[[torch.Tensor], torch.Tensor],
        teacher_fingerprint: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
        augment=None,
        views: int = 0,
    ) -> TeacherCache:
        fp = getattr(dataset, "fingerprint", None)
        if fp is None:
            raise DataError("distill.cache_teacher: this data set cannot be fingerprinted; set cache_teacher: false")
        data_fp = fp()
        if views:  # the augmentation and the number of views are part of what the outputs depend on
            data_fp = f"{data_fp}|views={views}|{augment!r}"
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        key = cache_key(teacher_fingerprint, data_fp)
        npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
        if npy.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = {}
            if (
                meta.get("teacher") == teacher_fingerprint
                and meta.get("data") == data_fp
                and meta.get("n") == len(dataset)
            ):
                if meta.get("sha256") == sha256_file(npy):
                    logits = np.load(npy, mmap_mode="r")
                    log(f"teacher cache: reusing {npy} ({logits.shape[0]} × {logits.shape[-1]})")
                    return cls(logits, npy)
                log(f"teacher cache: {npy} is damaged (its hash differs from {meta_path.name}); rebuilding")
            else:
                log(f"teacher cache: {npy} does not match this teacher and data; rebuilding")
        if views:
            per_view = [compute_logits(dataset, forward, batch_size, device, augment, v) for v in range(views)]
            logits = np.stack(per_view, axis=1)  # (N, K, C)
        else:
            logits = compute_logits(dataset, forward, batch_size, device)
        write_with(npy, lambda p: save_npy(p, logits))
        write_json(
            meta_path,
            {
                "teacher": teacher_fingerprint,
                "data": data_fp,
                "n": len(dataset),
                "num_classes": int(logits.shape[-1]),
                "dtype": "float32",
                "sha256": sha256_file(npy),
            },
        )
        log(f"teacher cache: wrote {npy} ({logits.nbytes / 1e6:.2f} MB)")
        return cls(np.load(npy, mmap_mode="r"), npy)


@torch.inference_mode()
def compute_logits(dataset: Dataset, forward, batch_size: int, device, augment=None, view: int = 0) -> np.ndarray:
    """Teacher logits for every example in order; with `augment`, for view `view` of each example."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=getattr(dataset, "collate", collate))
    out = []
    for batch in loader:
        inputs = batch.inputs.to(device)
        if augment is not None:
            inputs = augment.view(inputs, batch.index, torch.full_like(batch.index, view))
        out.append(forward(inputs).float().cpu())
    return torch.cat(out).numpy()
