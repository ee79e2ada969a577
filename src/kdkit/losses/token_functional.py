"""Token-level distillation losses for language models, as pure functions over (B, T, V) logits.

Conventions, the same for every function here:

- **Shift.** With shift=True (the causal-LM convention, as in Hugging Face and TRL) the logits at position t
  predict the token at t + 1: the logits at positions 0 … T−2 are compared, and position t counts iff
  labels[b, t + 1] ≠ ignore_index. The logits at position T−1 predict nothing and are never read. The same
  positions are taken from the student and the teacher. With shift=False position t counts iff
  labels[b, t] ≠ ignore_index (labels already aligned with the logits). labels=None: every position counts.
- **Masking and normalisation.** Only real positions are gathered (by index) before any arithmetic, so the logits
  at masked positions are never read: garbage there (even NaN/inf) changes neither the loss nor any gradient.
  The loss is Σ_{real positions} D / N, where N is the number of real positions in this call, or the global count
  passed as num_real_tokens (all micro-batches of an optimizer step, all processes), so that summing the
  micro-batch losses of an accumulation step gives exactly the loss of the whole batch. No real position: 0.
- **fp32.** Logits are upcast to float32 before the log-softmax; bf16/fp16 inputs give a float32 loss equal to the
  computation on the upcast logits (a half-precision softmax loses the small probabilities distillation transfers).
  float64 logits stay float64 (and give a float64 loss), so the math can be checked with gradcheck.
- **Temperature.** p = softmax(teacher / T) and q = softmax(student / T), and every divergence is multiplied by T²
  (Hinton et al. 2015): the gradient of a KL-type divergence with respect to the logits shrinks as 1/T² at high T,
  so T² keeps its magnitude — and a loss weight's meaning — roughly independent of T. kdkit applies the same T²
  to every direction, tvd included (whose gradient shrinks only as 1/T: for tvd the T² is a plain constant factor).
  TRL's generalized_jsd_loss does not multiply by T²: at T ≠ 1 kdkit's value is T² times TRL's.
- **Teacher.** A fixed target: its logits are detached (an inference-mode tensor is fine); gradients reach the
  student's logits only.
- **Chunking.** chunk_size=k computes the real positions k at a time (gathered first, then split), and computes each
  chunk's gradient with respect to the student's logits during the forward pass, so at most k × V probabilities
  (and their autograd intermediates) are alive at once; the only full-size tensor kept is the gradient itself,
  in the student logits' dtype. Values and gradients equal the unchunked path (up to float rounding). The chunked
  loss supports one backward pass (no retain_graph) and no double backward.

Shapes: student_logits, teacher_logits (B, T, V); labels (B, T) int64 → a () float32 tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DIRECTIONS = ("forward", "reverse", "jsd", "tvd")


def real_positions(
    labels: torch.Tensor | None,
    batch: int,
    length: int,
    shift: bool = True,
    ignore_index: int = -100,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): the (b, t) indices of the logits that count, in row-major order.

    shift=True: t ∈ [0, T−2] with labels[b, t + 1] ≠ ignore_index; shift=False: labels[b, t] ≠ ignore_index.
    labels None: every position (after the shift). labels: (B, T) matching the logits' first two dims.
    """
    if labels is None:
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        if labels.dim() != 2 or tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape ({batch}, {length}, V)")
        keep = labels.to(device) != ignore_index
    if shift:
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)  # logits t ↔ label t+1; t=T−1 drops
    rows, cols = keep.nonzero(as_tuple=True)
    return rows, cols


def count_real_tokens(labels: torch.Tensor | None, shift: bool = True, ignore_index: int = -100) -> int:
    """The number of positions that count for labels (B, T) under the shift convention above.

    Sum this over the micro-batches of an optimizer step (and all-reduce it over processes) to get the global
    count to pass as num_real_tokens. labels None is not countable without the logits' shape: pass it explicitly.
    """
    if labels is None:
        raise ValueError("count_real_tokens: labels=None; every position counts: B·(T−1) with shift, else B·T")
    keep = labels != ignore_index
    return int((keep[:, 1:] if shift else keep).sum())


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: half precision is upcast, float64 is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a (log a − log b) over the last dim, with 0 · log 0 = 0: an id that one side rules out (logit −inf,
    e.g. a masked or padding id) adds nothing instead of NaN, and its gradient stays finite."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def per_position_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The divergence at each position, times T². Shapes: (N, V), (N, V) → (N,) float32 (float64 for float64).

    With p = softmax(teacher / T) (the teacher's end) and q = softmax(student / T) (the student's end):

        forward  KL(p ‖ q) = Σ_v p (log p − log q)           mean-seeking; classic KD (Hinton et al. 2015)
        reverse  KL(q ‖ p) = Σ_v q (log q − log p)           mode-seeking (MiniLLM, Gu et al. 2024)
        jsd      JSD_β(p, q) = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),   m = β · p + (1 − β) · q
        tvd      TV(p, q) = ½ Σ_v |p − q|                     (Wen et al. 2023, "f-Divergence Minimization for
                                                              Sequence-Level Knowledge Distillation")

    jsd is the generalized JSD of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1),
    with the same convention as TRL's GKDTrainer.generalized_jsd_loss: β weights the TEACHER's end — it is the
    teacher's share of the mixture m and the weight of KL(teacher ‖ m). β = 0.5 is the symmetric JSD.
    At the ends the mixture degenerates (JSD_0 = JSD_1 = 0), so, as in TRL, β = 0 is defined as forward KL(p ‖ q)
    and β = 1 as reverse KL(q ‖ p): these are the limits of JSD_β / β as β → 0 and of JSD_β / (1 − β) as β → 1,
    so the value jumps in scale at the ends (JSD_0.01 ≈ 0.01 · KL(p ‖ q)).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {', '.join(DIRECTIONS)}")
    t = float(temperature)
    log_q = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_p = F.log_softmax(_upcast(teacher_logits.detach()) / t, dim=-1)
    if direction == "jsd" and beta == 0.0:
        direction = "forward"
    elif direction == "jsd" and beta == 1.0:
        direction = "reverse"
    if direction == "forward":
        d = _kl(log_p, log_q)
    elif direction == "reverse":
        d = _kl(log_q, log_p)
    elif direction == "jsd":
        # log m = logsumexp(log p + log β, log q + log(1 − β)), stable in log space. An id ruled out on both sides
        # (−inf twice) would give logaddexp a NaN gradient: clamp to the dtype's lowest finite value (grad 0 there).
        lowest = torch.finfo(log_p.dtype).min
        log_m = torch.logaddexp(log_p.clamp_min(lowest) + math.log(beta), log_q.clamp_min(lowest) + math.log1p(-beta))
        d = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    else:
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return d * (t * t)


class _ChunkedSum(torch.autograd.Function):
    """Σ per_position_divergence over the gathered positions / denom, computed chunk by chunk.

    The forward computes each chunk's value and its gradient with respect to the student's logits (autograd on
    the chunk alone) and writes the gradient into one buffer shaped like the student's logits; backward scales
    that buffer. So at most chunk_size × V probabilities are alive at once.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, cols, chunk_size, direction, beta, temperature, denom, needs_grad):
        grad = torch.zeros_like(student) if needs_grad else None
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        total = torch.zeros((), dtype=dtype, device=student.device)
        for r, c in zip(rows.split(chunk_size), cols.split(chunk_size)):
            s = student[r, c].detach().requires_grad_(needs_grad)  # (k, V), the student's dtype
            t = teacher[r, c]
            with torch.set_grad_enabled(needs_grad):
                part = per_position_divergence(s, t, direction, beta, temperature).sum() / denom
            if needs_grad:
                (g,) = torch.autograd.grad(part, s)
                grad.index_put_((r, c), g, accumulate=False)  # each (b, t) appears once
            total += part.detach()
        ctx.grad = grad
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the chunked token loss supports one backward pass; use chunk_size=None to retain_graph")
        ctx.grad = None  # scaled in place and handed over: no second full-size tensor
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None, None, None, None


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    shift: bool = True,
    num_real_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token-level distillation loss: Σ_{real positions} per_position_divergence / N.

    See the module docstring for the shift, masking, normalisation (N = num_real_tokens or the local count), fp32,
    T² and chunking conventions, and per_position_divergence for the directions and β.
    Shapes: (B, T, V), (B, T, V), (B, T) or None → () float32.
    """
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of one shape (B, T, V); got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}; expected 0 ≤ beta ≤ 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of positions or None")
    b, t, _ = student_logits.shape
    rows, cols = real_positions(labels, b, t, shift, ignore_index, student_logits.device)
    if num_real_tokens is None:
        denom = float(max(rows.numel(), 1))
    elif isinstance(num_real_tokens, torch.Tensor):
        denom = num_real_tokens.to(device=student_logits.device).clamp_min(1)
    else:
        if num_real_tokens < rows.numel():
            raise ValueError(f"num_real_tokens={num_real_tokens} is below this batch's {rows.numel()} real positions")
        denom = float(max(num_real_tokens, 1))
    teacher = teacher_logits.detach()
    if chunk_size is None:
        # Advanced indexing gathers the real rows (a copy; an inference tensor becomes an ordinary one).
        per = per_position_divergence(student_logits[rows, cols], teacher[rows, cols], direction, beta, temperature)
        return per.sum() / denom
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedSum.apply(
        student_logits, teacher, rows, cols, chunk_size, direction, float(beta), float(temperature), denom, needs_grad
    )


def forward_kl(student_logits, teacher_logits, labels=None, temperature=1.0, **kw) -> torch.Tensor:
    """T² · KL(p_teacher ‖ q_student) per real token (token_divergence with direction="forward")."""
    return token_divergence(student_logits, teacher_logits, labels, "forward", temperature=temperature, **kw)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature=1.0, **kw) -> torch.Tensor:
    """T² · KL(q_student ‖ p_teacher) per real token (token_divergence with direction="reverse")."""
    return token_divergence(student_logits, teacher_logits, labels, "reverse", temperature=temperature, **kw)


def jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, **kw) -> torch.Tensor:
    """T² · JSD_β(p_teacher, q_student) per real token; β weights the teacher's end (TRL's convention)."""
    return token_divergence(student_logits, teacher_logits, labels, "jsd", beta, temperature, **kw)


def tvd(student_logits, teacher_logits, labels=None, temperature=1.0, **kw) -> torch.Tensor:
    """T² · ½ Σ |p_teacher − q_student| per real token (token_divergence with direction="tvd")."""
    return token_divergence(student_logits, teacher_logits, labels, "tvd", temperature=temperature, **kw)
