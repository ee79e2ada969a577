"""Token losses computed from the student's last hidden state and its output head, chunk by chunk.

A language model's logits are hidden (B, T, H) @ W (V, H)ᵀ + b. At V = 49k the (B, T, V) logits and their gradient
are the largest tensors of a distillation step, and the softmax passes over them half its time. Here the head is
applied to a chunk of real positions at a time: the chunk's logits, every token term on them, the gradient of the
weighted sum with respect to those logits, and from it the gradients of the hidden chunk (g @ W) and of the head
(gᵀ @ h, accumulated) are computed in the forward pass; the chunk's logits are then dropped. So neither the full
logits nor their gradient ever exist, and backward only scales what the forward accumulated — the approach of
Liger-Kernel's fused linear cross-entropy / JSD, in plain PyTorch so that it runs on CPU and GPU alike.

A teacher may come the same way (its hidden state and head: its chunk of logits is made under no_grad next to the
student's), as dense logits, or from the top-k cache; each term reads the teacher chunk it needs.

The conventions (shift, real positions, division by the step's count, fp32, T²) are those of
kdkit.losses.token_functional: each term is a TokenTerm made by its loss (TokenCE.token_term, TokenKL.token_term),
and the value and gradient equal those of the same terms on the materialised logits to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

# Positions per chunk when no loss asks for a size: about 8 M logits (32 MB in fp32) on a CPU, where a chunk that fits
# the caches is fastest, and 64 M on a GPU, where small chunks leave it idle between kernels.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


@dataclass
class TokenTerm:
    """One token loss as the fused pass needs it.

    values(z, t, r, c) → (k,) per-position values of the loss (T² included, not yet divided) for the student's fp32
    logits z (k, V) at positions (r, c), t the teacher's logits there (None for a term that reads no dense teacher).
    values_and_grad, when given, returns them with d values.sum() / d z in closed form (no autograd graph).
    denom: what the term's sum is divided by (the step's count, or this batch's). weight: its weight in the total.
    reads_teacher: the term reads the dense teacher chunk t.
    """

    values: Callable
    denom: float | torch.Tensor
    weight: float
    reads_teacher: bool
    values_and_grad: Callable | None = None


def default_chunk(vocab: int, device: torch.device) -> int:
    """Positions per chunk for a vocabulary of `vocab` on `device` (CHUNK_ELEMENTS), at least 16."""
    return max(16, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(vocab, 1))


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h (k, H) @ weight (V, H)ᵀ + bias, in h's dtype (as the model's own head runs under its precision)."""
    w = weight.to(h.dtype)
    return h @ w.t() if bias is None else torch.addmm(bias.to(h.dtype), h, w.t())


class _FusedHead(torch.autograd.Function):
    """total = Σ_terms weight · Σ_chunks values.sum() / denom; gradients for hidden, the head's weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, cols, terms, teacher_chunk, chunk_size, parts, needs_grad):
        h_all = hidden.detach()[rows, cols]  # (N, H) the real positions only
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; float64 stays float64
        acc = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        sums = [torch.zeros((), dtype=dtype, device=hidden.device) for _ in terms]
        if needs_grad:
            grad_h = torch.zeros_like(h_all)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        w_detached = weight.detach()
        b_detached = None if bias is None else bias.detach()
        for lo in range(0, h_all.shape[0], chunk_size):
            hi = min(lo + chunk_size, h_all.shape[0])
            h, r, c = h_all[lo:hi], rows[lo:hi], cols[lo:hi]
            with torch.no_grad():
                z = head_logits(h, w_detached, b_detached).to(dtype)
                t = teacher_chunk(r, c) if teacher_chunk is not None else None
            g = None  # d total / d z of this chunk, summed over the terms
            graph = []  # terms whose gradient autograd computes, on one shared leaf
            for i, term in enumerate(terms):
                if needs_grad and term.values_and_grad is not None:
                    values, grad = term.values_and_grad(z, t, r, c)  # grad: a fresh buffer, scaled in place
                    grad = grad.mul_(term.weight / term.denom)
                    g = grad if g is None else g.add_(grad)
                    sums[i] += values.sum().detach()
                elif needs_grad:
                    graph.append(i)
                else:
                    sums[i] += term.values(z, t, r, c).sum()
            if graph:
                leaf = z.detach().requires_grad_(True)
                with torch.enable_grad():
                    per = [terms[i].values(leaf, t, r, c).sum() for i in graph]
                    scalar = sum(per[j] * (terms[i].weight / terms[i].denom) for j, i in enumerate(graph))
                    (gz,) = torch.autograd.grad(scalar, leaf)
                g = gz if g is None else g.add_(gz)
                for j, i in enumerate(graph):
                    sums[i] += per[j].detach()
            if needs_grad and g is not None:
                g = g.to(h.dtype)
                grad_h[lo:hi] = g @ w_detached.to(h.dtype)
                grad_w.addmm_(g.t().to(acc), h.to(acc))
                if grad_b is not None:
                    grad_b.add_(g.to(acc).sum(0))
        for i, term in enumerate(terms):
            part = sums[i] / term.denom
            parts.append(part)
            total = total + term.weight * part
        if needs_grad:
            ctx.saved = (grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
            ctx.shape = hidden.shape
            ctx.rows, ctx.cols = rows, cols
        else:
            ctx.saved = None
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.saved is None:
            raise RuntimeError("the fused token loss supports one backward pass")
        grad_h, grad_w, grad_b = ctx.saved
        ctx.saved = None
        scale = grad_output.to(grad_h.dtype)
        grad_hidden = grad_h.new_zeros(ctx.shape)
        grad_hidden[ctx.rows, ctx.cols] = grad_h.mul_(scale)
        grad_w = grad_w.mul_(grad_output.to(grad_w.dtype))
        grad_b = None if grad_b is None else grad_b.mul_(grad_output.to(grad_b.dtype))
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None, None


def fused_token_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    rows: torch.Tensor,
    cols: torch.Tensor,
    terms: list[TokenTerm],
    teacher_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Σ weight · term, [each term before weighting]) over the real positions (rows, cols) of hidden (B, T, H).

    head: the student's output layer (an nn.Linear: weight (V, H), optional bias). teacher_chunk(r, c) → the dense
    teacher's (k, V) logits at those positions, for the terms that read it. chunk_size: positions per chunk
    (default_chunk when None). The total has gradients for hidden, head.weight and head.bias (one backward pass);
    the parts are detached, for logging.
    """
    weight, bias = head.weight, getattr(head, "bias", None)
    if chunk_size is None:
        chunk_size = default_chunk(weight.shape[0], hidden.device)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    parts: list[torch.Tensor] = []
    total = _FusedHead.apply(hidden, weight, bias, rows, cols, terms, teacher_chunk, chunk_size, parts, needs_grad)
    return total, [p.detach() for p in parts]
