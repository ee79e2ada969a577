"""A model's logits at chosen positions only: read from its logits, or its head applied to its hidden state there.

The cross-tokenizer losses that compare next-token distributions (uld, hybrid_kl) read each side at the aligned
spans' last tokens only (kdkit.data.align.SpanIndex). A causal LM that gave its last hidden state and output head
instead of its (B, T, V) logits (kdkit.models.lm_head: the student through the engine, a teacher through
Teacher.hidden_forward) then never makes the logits of the other positions: the head runs on the N gathered rows,
forward and backward. The rows are the same as those gathered from whole logits (the head applied row by row; equal
up to float rounding, tested).
"""

from __future__ import annotations

import torch

from kdkit.data.align import take
from kdkit.losses.fused_head import head_logits
from kdkit.types import ModelOutputs


def logits_at(outputs: torch.Tensor | ModelOutputs, positions: torch.Tensor, mask: torch.Tensor,
              columns: torch.Tensor | None = None) -> torch.Tensor:
    """The logits at positions[b, k] for every real (b, k) (mask True), in row-major order: (N, V). outputs: logits
    (B, T, V), or a ModelOutputs with logits or with hidden (B, T, H) and head. columns: a permutation of the
    vocabulary (V,) to put the logits' columns in (the head's rows are permuted instead of the N × V logits)."""
    if not isinstance(outputs, torch.Tensor) and outputs.logits is None and outputs.hidden is not None:
        hidden = take(outputs.hidden, positions, mask)
        weight, bias = outputs.head.weight, getattr(outputs.head, "bias", None)
        if columns is not None and not is_identity(columns):
            columns = columns.to(weight.device)
            weight, bias = weight[columns], None if bias is None else bias[columns]
        return head_logits(hidden, weight, bias)
    return in_order(take(outputs if isinstance(outputs, torch.Tensor) else outputs.logits, positions, mask), columns)


def in_order(logits: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """logits (N, V) with their columns in the order `columns` (V,); the logits themselves for None or the identity."""
    if columns is None or is_identity(columns):
        return logits
    return logits[:, columns.to(logits.device)]


def is_identity(columns: torch.Tensor) -> bool:
    """columns is 0, 1, ..., V − 1 (a comparison read back to the host: callers on a hot path pass None instead)."""
    return torch.equal(columns, torch.arange(columns.numel(), device=columns.device))
