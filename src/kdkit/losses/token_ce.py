"""Next-token cross-entropy of a causal language model with the real text (the language-modelling loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_real_tokens: int | float | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Σ over predicted positions of −log softmax(logits[b, t])[labels[b, t + 1]], divided by N.

    logits (B, T, V), labels (B, T) int64 (the input ids, -100 where nothing is predicted) → () float32.
    The logits at t predict the token at t + 1 (the shift of Hugging Face's causal LMs); positions whose next label
    is -100 are gathered out before any arithmetic, so their logits are never read. Computed in fp32 whatever the
    logits' dtype. N = num_real_tokens (the engine's per-micro-batch share of the optimizer step's global count,
    so that micro-batches and processes add up to the whole step's mean), or this batch's count when None.
    No predicted position: 0.
    """
    keep = labels[:, 1:] != ignore_index  # (B, T-1)
    rows, cols = keep.nonzero(as_tuple=True)
    if rows.numel() == 0:  # an empty slice keeps the graph without reading a value (NaN there stays unread)
        return logits[..., :0].float().sum()
    picked = logits[rows, cols].float()  # (N, V): only the positions that count
    total = F.cross_entropy(picked, labels[rows, cols + 1], reduction="sum")
    if num_real_tokens is None:
        return total / rows.numel()
    if isinstance(num_real_tokens, torch.Tensor):
        num_real_tokens = num_real_tokens.to(total.device, torch.float32)
    return total / num_real_tokens


class TokenCE(Loss):
    """token_cross_entropy(student logits, batch.labels): the causal-LM loss on the real text (hard targets)."""

    name = "token_ce"
    needs_teacher = False

    def __init__(self):  # no parameters: an unknown one in the config is then an error, not ignored
        super().__init__()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        return token_cross_entropy(student.logits, batch.labels, batch.num_real_tokens)
