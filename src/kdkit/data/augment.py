"""Augmentation applied to a batch on its device, the same batch then going to the teacher and to the student
("consistent teaching", Beyer et al. 2022: the teacher labels exactly what the student sees).

Per-example transforms (random translation by padding and cropping, horizontal flip, Gaussian noise) are drawn
from a counter-based hash of (seed, example index, view), not from a running random state. So a view is
reproducible: the teacher-output cache can store the teacher's outputs for K views of every example and training
can replay any of them exactly, and a resumed run sees the same augmented inputs as an uninterrupted one.
Mixup and CutMix mix pairs within a batch: they need the live teacher (a mixed input has no cached output).
Token-id inputs (text) have their own transforms with the same interface: kdkit.data.text_augment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.types import Batch

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, index: np.ndarray, view: np.ndarray, stream: int) -> np.ndarray:
    """A float in [0, 1) per example, a pure function of (seed, index, view, stream)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x632BE59BD9B4E019) + np.uint64(stream))
        h = _splitmix64(
            key ^ _splitmix64(index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + view.astype(np.uint64))
        )
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def position_uniform(seed: int, index: np.ndarray, view: np.ndarray, length: int, stream: int) -> np.ndarray:
    """A float in [0, 1) per (example, position): (B,) index and view → (B, length), a pure function of
    (seed, index, view, stream, position). Position p of an example gets the same number whatever the batch's
    padded length, so a sequence's augmentation does not depend on the batch it lands in."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x632BE59BD9B4E019) + np.uint64(stream))
        h = _splitmix64(
            key ^ _splitmix64(index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + view.astype(np.uint64))
        )
        pos = _splitmix64(np.arange(length, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03) + key)
        h = _splitmix64(h[:, None] ^ pos[None, :])
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def choose_views(index: torch.Tensor, seed: int, epoch: int, views: int = 0) -> torch.Tensor:
    """The view id (B,) of each example in a training batch: views > 0, one of the `views` stored views (teacher
    cache), drawn per (seed, epoch, example); otherwise one fresh view per (seed, epoch), shared by all examples
    (each example's transform still differs: it is hashed with the example's index)."""
    idx = index.cpu().numpy()
    if views:
        pick = uniform(seed + 7919 * (epoch + 1), idx, np.zeros_like(idx), 5)
        return torch.from_numpy(np.floor(pick * views).astype(np.int64))
    return torch.full((len(idx),), 1_000_003 * seed + epoch, dtype=torch.long)


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0
    hflip: bool = False
    noise_std: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.per_example or self.mixes

    @property
    def per_example(self) -> bool:
        return self.crop_padding > 0 or self.hflip or self.noise_std > 0

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def describe(self) -> str:
        ops = []
        if self.crop_padding:
            ops.append(f"translate ±{self.crop_padding}px")
        if self.hflip:
            ops.append("h-flip")
        if self.noise_std:
            ops.append(f"noise σ={self.noise_std:g}")
        if self.mixup_alpha:
            ops.append(f"mixup α={self.mixup_alpha:g}")
        if self.cutmix_alpha:
            ops.append(f"cutmix α={self.cutmix_alpha:g}")
        return ", ".join(ops) or "none"

    def view(self, inputs: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Per-example transforms of `inputs` (B, ...) for the given example indices and view ids (B,)."""
        idx, v = index.cpu().numpy(), view.cpu().numpy()
        x = inputs
        if self.crop_padding and x.dim() == 4:
            p = self.crop_padding
            dx = np.floor(uniform(self.seed, idx, v, 1) * (2 * p + 1)).astype(int)
            dy = np.floor(uniform(self.seed, idx, v, 2) * (2 * p + 1)).astype(int)
            padded = F.pad(x, (p, p, p, p))
            h, w = x.shape[-2:]
            x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(x.shape[0])])
        if self.hflip and x.dim() == 4:
            flip = torch.from_numpy(uniform(self.seed, idx, v, 3) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.noise_std:
            noise = torch.stack(
                [
                    torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                    for s in (uniform(self.seed, idx, v, 4) * 2**62).astype(np.int64)
                ]
            ).to(x.device, x.dtype)
            x = x + self.noise_std * noise
        return x

    def apply(self, batch: Batch, seed: int, epoch: int, views: int = 0) -> Batch:
        """Augment a training batch. views > 0: pick one of `views` stored views per example (teacher cache);
        otherwise a fresh view per epoch. Mixup/CutMix (never with views) use the global torch RNG."""
        x, view = batch.inputs, None
        if self.per_example:
            view = choose_views(batch.index, seed, epoch, views)
            x = self.view(x, batch.index, view)
        out = Batch(x, batch.labels, batch.index, batch.attention_mask, view=view)
        if self.mixes:
            out = self._mix(out)
        return out

    def _mix(self, batch: Batch) -> Batch:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(()).item() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())).beta(alpha, alpha))
        perm = torch.randperm(batch.inputs.shape[0], device=batch.inputs.device)
        x = batch.inputs
        if use_cutmix and x.dim() == 4:
            h, w = x.shape[-2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = int(torch.randint(0, h, ()).item()), int(torch.randint(0, w, ()).item())
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = lam * x + (1 - lam) * x[perm]
        return Batch(
            x,
            batch.labels,
            batch.index,
            batch.attention_mask,
            view=batch.view,
            mixed_labels=batch.labels[perm],
            mix_lambda=lam,
        )
