"""Augmentation of token-id batches for distillation: token masking, deletion and adjacent swap (the noising of
EDA, Wei & Zou 2019, and of TinyBERT's augmented transfer set, Jiao et al. 2020, done on ids).

The teacher labels exactly the student's augmented input. Special tokens ([CLS], [SEP], [MASK], ...) and padding
are never touched; [UNK] counts as a real token. Each real token is, with its own probability:
  1. deleted (the rest moves left, padding fills the end, so the shape (B, T) stays);
  2. swapped with its right neighbour (greedily left to right; a token moved by a swap starts no other swap, and
     a swap never crosses a special token), so a token starts a swap with probability ≈ p / (1 + p);
  3. replaced by the mask token (the unk token for a tokenizer without one).
Every draw is a counter-based hash of (seed, example index, view, position) (kdkit.data.augment), so view k of
example i is the same in every batch, epoch and run: the teacher cache can store views and replay them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdkit.data.augment import choose_views, position_uniform
from kdkit.types import Batch


def augment_tokens(
    ids: np.ndarray,
    protected: np.ndarray,
    u_delete: np.ndarray,
    u_swap: np.ndarray,
    u_mask: np.ndarray,
    delete: float,
    swap: float,
    mask: float,
    mask_id: int,
    pad_id: int,
) -> np.ndarray:
    """One right-padded sequence ids (T,) → its augmented copy (T,). protected (T,) bool: special tokens and
    padding, never changed or moved past. u_* (T,) uniforms in [0, 1): u_delete is read at the original
    positions, u_swap and u_mask at the positions after deletion."""
    keep = protected | (u_delete >= delete)
    out, prot = ids[keep].copy(), protected[keep]
    n = len(out)
    if swap > 0:
        i = 0
        while i < n - 1:
            if not prot[i] and not prot[i + 1] and u_swap[i] < swap:
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 2  # the moved token starts no second swap
            else:
                i += 1
    if mask > 0:
        out[~prot & (u_mask[:n] < mask)] = mask_id
    result = np.full(len(ids), pad_id, dtype=ids.dtype)
    result[:n] = out
    return result


@dataclass(frozen=True)
class TextAugment:
    """Per-example token transforms with the interface of kdkit.data.augment.Augment (view, apply).

    token_mask / token_delete / token_swap: probabilities per real token (0: off). pad_id, mask_id and
    special_ids come from the tokenizer of the data (mask_id: its mask token, or unk when it has none)."""

    token_mask: float = 0.0
    token_delete: float = 0.0
    token_swap: float = 0.0
    seed: int = 0
    pad_id: int = 0
    mask_id: int | None = None
    special_ids: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.per_example

    @property
    def per_example(self) -> bool:
        return self.token_mask > 0 or self.token_delete > 0 or self.token_swap > 0

    @property
    def mixes(self) -> bool:
        return False

    def describe(self) -> str:
        ops = []
        if self.token_mask:
            ops.append(f"token mask p={self.token_mask:g}")
        if self.token_delete:
            ops.append(f"token delete p={self.token_delete:g}")
        if self.token_swap:
            ops.append(f"token swap p={self.token_swap:g}")
        return ", ".join(ops) or "none"

    def view(self, inputs: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded token ids → the augmented ids (B, T) of these example indices and view ids (B,)."""
        ids = inputs.detach().cpu().numpy()
        idx, v = index.cpu().numpy(), view.cpu().numpy()
        length = ids.shape[1]
        u_delete = position_uniform(self.seed, idx, v, length, 11)
        u_swap = position_uniform(self.seed, idx, v, length, 12)
        u_mask = position_uniform(self.seed, idx, v, length, 13)
        protected = np.isin(ids, np.asarray((*self.special_ids, self.pad_id), dtype=ids.dtype))
        mask_id = self.mask_id if self.mask_id is not None else self.pad_id  # unused when token_mask is 0
        rows = [
            augment_tokens(
                ids[b],
                protected[b],
                u_delete[b],
                u_swap[b],
                u_mask[b],
                self.token_delete,
                self.token_swap,
                self.token_mask,
                mask_id,
                self.pad_id,
            )
            for b in range(ids.shape[0])
        ]
        return torch.from_numpy(np.stack(rows)).to(inputs.device, inputs.dtype)

    def apply(self, batch: Batch, seed: int, epoch: int, views: int = 0) -> Batch:
        """Augment a training batch: views > 0, one of `views` stored views per example (teacher cache);
        otherwise a fresh view per epoch. The attention mask follows the moved padding."""
        if not self.per_example:
            return batch
        view = choose_views(batch.index, seed, epoch, views)
        x = self.view(batch.inputs, batch.index, view)
        mask = None if batch.attention_mask is None else (x != self.pad_id).to(batch.attention_mask.dtype)
        return Batch(x, batch.labels, batch.index, mask, view=view)
