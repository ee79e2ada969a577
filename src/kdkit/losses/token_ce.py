"""Next-token cross-entropy of a causal language model with the real text (the language-modelling loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses import token_functional as Ft
from kdkit.losses.base import Loss, ParamError
from kdkit.losses.fused_head import TokenTerm
from kdkit.types import Batch, ModelOutputs


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_real_tokens: int | float | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """Σ over predicted positions of −log softmax(logits[b, t])[labels[b, t + 1]], divided by N.

    logits (B, T, V), labels (B, T) int64 (the input ids, -100 where nothing is predicted) → () float32.
    The logits at t predict the token at t + 1 (the shift of Hugging Face's causal LMs); positions whose next label
    is -100 are gathered out before any arithmetic, so their logits are never read. shift=False: labels are
    already aligned with the logits, the logits at t are scored against labels[b, t] where it is not -100.
    Computed in fp32 whatever the logits' dtype. N = num_real_tokens (the engine's per-micro-batch share of the
    optimizer step's global count under the same shift convention, so that micro-batches and processes add up to
    the whole step's mean), or this batch's count when None. No predicted position: 0.
    """
    rows, cols = Ft.real_positions(labels, logits.shape[0], logits.shape[1], shift, ignore_index, logits.device)
    if rows.numel() == 0:  # an empty slice keeps the graph without reading a value (NaN there stays unread)
        return logits[..., :0].float().sum()
    picked = logits[rows, cols].float()  # (N, V): only the positions that count
    total = F.cross_entropy(picked, labels[rows, cols + 1 if shift else cols], reduction="sum")
    if num_real_tokens is None:
        return total / rows.numel()
    if isinstance(num_real_tokens, torch.Tensor):
        num_real_tokens = num_real_tokens.to(total.device, torch.float32)
    return total / num_real_tokens


class TokenCE(Loss):
    """token_cross_entropy(student logits, batch.labels): the causal-LM loss on the real text (hard targets).

    shift: causal LM (logits t predict labels t + 1, the default); false: labels already aligned with the logits.
    Divides by the engine's count of the step for the same shift setting (Ft.step_count).
    """

    name = "token_ce"
    needs_teacher = False

    def __init__(self, shift: bool = True):
        super().__init__()
        if not isinstance(shift, bool):
            raise ParamError("shift", shift, "true or false")
        self.shift = shift

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        count = Ft.step_count(batch, self.shift)
        return token_cross_entropy(student.logits, batch.labels, count, shift=self.shift)

    def token_term(
        self, teacher: ModelOutputs | None, batch: Batch, n_real: int, weight: float, vocab: int
    ) -> TokenTerm:
        """This loss for the fused head (kdkit.losses.fused_head): −log q[next label] per position, with the
        softmax-cross-entropy gradient q − onehot in closed form; the same count as forward()."""
        count = Ft.step_count(batch, self.shift)
        targets = batch.labels
        step = 1 if self.shift else 0

        def values(z, t, r, c):
            y = targets[r, c + step]
            return torch.logsumexp(z, dim=-1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)

        def values_and_grad(z, t, r, c):
            y = targets[r, c + step].unsqueeze(-1)
            log_q = torch.log_softmax(z, dim=-1)
            per = -log_q.gather(-1, y).squeeze(-1)
            return per, log_q.exp_().scatter_add_(-1, y, torch.full_like(y, -1, dtype=z.dtype))

        denom = float(max(n_real, 1)) if count is None else count.to(torch.float32)
        return TokenTerm(values, denom, weight, reads_teacher=False, values_and_grad=values_and_grad)

    def describe(self) -> str:
        return "token_ce" if self.shift else "token_ce(shift=false)"
