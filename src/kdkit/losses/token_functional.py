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

sparse_token_divergence takes the teacher as SparseLogprobs (its top-k ids and log-probs plus the log of the rest
mass, from the offline cache kdkit.data.lm_cache) instead of dense logits, with the same conventions; topk_kl_error
measures what the top-k cache loses against the dense teacher.

drop_hardest_labels is AdaSPEC's token filter (TokenKL's drop_hardest): the labels with the positions of the largest
divergence set to ignore_index, for any of the losses above to be called with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kdkit.types import Batch, SparseLogprobs

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


def step_count(batch: Batch, shift: bool) -> torch.Tensor | None:
    """The engine's share of the optimizer step's global count of positions that count under `shift`, or None.

    The engine sets batch.num_real_tokens from shifted labels (labels[:, 1:] ≠ -100, kdkit.data.lm
    .predicted_positions) and batch.num_labelled_tokens from unshifted ones (labels ≠ -100). A loss with
    shift=False must not divide by the shifted count (off by T / (T − 1) on full blocks): without
    num_labelled_tokens it gets None and divides by its own micro-batch's count.
    """
    if shift:
        return batch.num_real_tokens
    return batch.num_labelled_tokens


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
    return _divergence(log_p, log_q, direction, beta) * (t * t)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, direction: str, beta: float) -> torch.Tensor:
    """The divergence of per_position_divergence between two normalised log-distributions (N, M) → (N,), no T².

    log_p is the teacher's end, log_q the student's; M is the vocabulary, or the k + 1 buckets of the sparse path.
    """
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
    return d


class _ChunkedSum(torch.autograd.Function):
    """Σ per_chunk(student rows, r, c) over the gathered positions / denom, computed chunk by chunk.

    per_chunk(s, r, c) → (k,) is the per-position divergence of the student's logits s = student[r, c] (k, V)
    against whatever teacher the caller closed over (dense logits, or the sparse top-k). The forward computes each
    chunk's value and its gradient with respect to the student's logits (autograd on the chunk alone) and writes
    the gradient into one buffer shaped like the student's logits; backward scales that buffer. So at most
    chunk_size × V probabilities are alive at once.
    """

    @staticmethod
    def forward(ctx, student, per_chunk, rows, cols, chunk_size, dtype, denom, needs_grad, with_grad=None):
        grad = torch.zeros_like(student) if needs_grad else None
        total = torch.zeros((), dtype=dtype, device=student.device)
        for r, c in zip(rows.split(chunk_size), cols.split(chunk_size)):
            if needs_grad and with_grad is not None:  # the gradient in closed form: no autograd graph per chunk
                values, g = with_grad(student[r, c].detach(), r, c)
                part = values.sum() / denom
                grad.index_put_((r, c), (g / denom).to(grad.dtype), accumulate=False)
                total += part
                continue
            s = student[r, c].detach().requires_grad_(needs_grad)  # (k, V), the student's dtype
            with torch.set_grad_enabled(needs_grad):
                part = per_chunk(s, r, c).sum() / denom
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
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None, None, None


def _check_common(direction: str, beta: float, temperature: float, chunk_size: int | None) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}; expected 0 ≤ beta ≤ 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive number of positions or None")


def denominator(n_real: int, num_real_tokens: int | torch.Tensor | None, device: torch.device):
    """N of the module docstring: the local count of real positions, or the global count given."""
    if num_real_tokens is None:
        return float(max(n_real, 1))
    if isinstance(num_real_tokens, torch.Tensor):
        return num_real_tokens.to(device=device).clamp_min(1e-12)  # a share of the step count can be < 1
    if num_real_tokens < n_real:
        raise ValueError(f"num_real_tokens={num_real_tokens} is below this batch's {n_real} real positions")
    return float(max(num_real_tokens, 1))


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
    _check_common(direction, beta, temperature, chunk_size)
    b, t, _ = student_logits.shape
    rows, cols = real_positions(labels, b, t, shift, ignore_index, student_logits.device)
    denom = denominator(rows.numel(), num_real_tokens, student_logits.device)
    teacher = teacher_logits.detach()
    if chunk_size is None:
        # Advanced indexing gathers the real rows (a copy; an inference tensor becomes an ordinary one).
        per = per_position_divergence(student_logits[rows, cols], teacher[rows, cols], direction, beta, temperature)
        return per.sum() / denom
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher.dtype), torch.float32)

    def per_chunk(s, r, c):
        return per_position_divergence(s, teacher[r, c], direction, beta, temperature)

    def with_grad(s, r, c):
        return forward_kl_with_grad(s, teacher[r, c], temperature)

    closed = with_grad if direction == "forward" or (direction == "jsd" and beta == 0.0) else None
    return _ChunkedSum.apply(student_logits, per_chunk, rows, cols, chunk_size, dtype, denom, needs_grad, closed)


def forward_kl_with_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL per position and its gradient, without autograd: (N, V), (N, V) → (N,), (N, V).

    value = T² · KL(p ‖ q) as in per_position_divergence; with q = softmax(z / T), d value / d z = T · (q − p)
    (the softmax-cross-entropy gradient, scaled by T² · 1/T). Computed in fp32 with in-place operations, so a chunk
    holds two (N, V) buffers instead of autograd's saved intermediates; the chunked path uses it for forward KL.
    """
    t = float(temperature)
    s, te = _upcast(student_logits), _upcast(teacher_logits.detach())
    log_q = F.log_softmax(s / t if t != 1.0 else s, dim=-1)
    log_p = F.log_softmax(te / t if t != 1.0 else te, dim=-1)
    p = log_p.exp()
    # 0 · log 0 = 0 as in _kl: an id ruled out (−inf) on either side is clamped to the lowest finite value, so that
    # p = 0 there multiplies a finite difference. Then one fused row-wise dot instead of exp/where/mul/sum passes.
    lowest = torch.finfo(log_p.dtype).min
    diff = log_p.clamp_min_(lowest).sub_(log_q.clamp_min_(lowest))
    values = torch.linalg.vecdot(p, diff) * (t * t)
    grad = log_q.exp_().sub_(p).mul_(t)  # reuses the student's buffer: q − p, times T
    return values, grad


# ----------------------------------------------------------------------------------------------------------------
# Sparse teacher: the top-k log-probabilities of an offline cache (kdkit.data.lm_cache) instead of dense logits.
# ----------------------------------------------------------------------------------------------------------------


def _teacher_buckets(logprobs: torch.Tensor, rest: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's (k + 1)-bucket log-distribution [top-k ids…, rest], renormalised: (N, k), (N,) → (N, k + 1).

    The cache stores the top-k log-probs in float16 (about 3 significant digits), so the k + 1 masses add up to 1
    only to ~1e-3; renormalising in fp32 makes the teacher's end an exact distribution, so that every divergence
    is ≥ 0 and is 0 when the student's coarsened distribution equals it.
    """
    log_p = torch.cat([logprobs.detach().to(dtype), rest.detach().to(dtype).unsqueeze(-1)], dim=-1)
    return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)


def _student_buckets(log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-distribution log_q (N, V) coarsened to the buckets [ids (N, k)…, the other V − k ids].

    The rest bucket is logsumexp over the ids not picked (not log1p(−Σ q_ids), which cancels catastrophically when
    the top k hold nearly all the mass). Picked ids are replaced by the dtype's lowest finite value rather than
    −inf, so that with k = V (nothing left) the rest is ~exp(−3e38) = 0 with a zero — not NaN — gradient.
    """
    picked = torch.zeros(log_q.shape, dtype=torch.bool, device=log_q.device).scatter_(-1, ids, True)
    lowest = torch.finfo(log_q.dtype).min
    log_rest = torch.where(picked, lowest, log_q).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([log_q.gather(-1, ids), log_rest], dim=-1)


def sparse_per_position_divergence(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    rest: torch.Tensor,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The divergence between the teacher's and the student's (k + 1)-bucket distributions, times T².

    Shapes: student_logits (N, V); ids (N, k) distinct int ids < V; logprobs (N, k) the teacher's log-probs of
    those ids at temperature T; rest (N,) the teacher's log of the mass outside them → (N,) float32 (float64 for
    float64 student logits). The buckets are the k ids and one "rest" bucket holding the other V − k ids: the
    teacher's end is [logprobs, rest] (renormalised, see _teacher_buckets), the student's end is
    q = softmax(student / T) summed into the same buckets. direction and β as in per_position_divergence.
    """
    t = float(temperature)
    log_q = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    log_qb = _student_buckets(log_q, ids.long())
    log_pb = _teacher_buckets(logprobs, rest, log_q.dtype)
    return _divergence(log_pb, log_qb, direction, beta) * (t * t)


def _check_sparse(student_logits: torch.Tensor, sparse: SparseLogprobs) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"expected student logits (B, T, V); got {tuple(student_logits.shape)}")
    b, t, v = student_logits.shape
    ids, lp, rest = sparse.ids, sparse.logprobs, sparse.rest
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (b, t) or lp.shape != ids.shape or tuple(rest.shape) != (b, t):
        raise ValueError(
            f"sparse teacher ids {tuple(ids.shape)}, logprobs {tuple(lp.shape)}, rest {tuple(rest.shape)} do not "
            f"fit student logits of shape {(b, t, v)}; expected (B, T, k), (B, T, k), (B, T)"
        )
    if ids.shape[-1] > v:
        raise ValueError(f"sparse teacher keeps k={ids.shape[-1]} ids, more than the student's {v} logits")


def sparse_token_divergence(
    student_logits: torch.Tensor,
    sparse: SparseLogprobs,
    labels: torch.Tensor | None = None,
    direction: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    shift: bool = True,
    num_real_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token-level distillation loss against a top-k teacher: Σ_{real positions} D_buckets / N.

    The teacher at each position is known only through its k most likely ids, their log-probs, and the log of the
    mass of all other ids (sparse.ids, sparse.logprobs, sparse.rest, (B, T, k), (B, T, k), (B, T)). The divergence
    is taken between two distributions over k + 1 buckets — the k ids and one rest bucket — the teacher's stored
    one, and the student's q = softmax(student_logits / T) coarsened to the same buckets (sparse_per_position_
    divergence). All four directions are supported (forward, reverse, jsd with β on the teacher's end, tvd).

    - With k = V (rest mass 0, rest = −inf) this is token_divergence on the dense teacher (up to storage rounding).
    - Coarsening can only lower an f-divergence (data-processing inequality), so with k < V the value is ≤ the
      dense one: the part of the divergence inside the rest bucket is not seen (kdkit.losses.token_functional.
      topk_kl_error measures how much).
    - The sparse teacher's temperature is the one it was cached at; `temperature` divides the student's logits
      and gives the T² factor, so the two must be equal (the cache's manifest records it; the caller checks).
    - Positions follow the logits (position t is the distribution over token t + 1), so shift, masking (masked
      positions, and the sparse entries there, are never read), normalisation by N = num_real_tokens or the local
      count, fp32 and chunking follow the module docstring exactly as for token_divergence.
    - Gradients reach the student's logits only (the sparse tensors are detached).

    Shapes: (B, T, V), SparseLogprobs, (B, T) or None → () float32.
    """
    _check_sparse(student_logits, sparse)
    _check_common(direction, beta, temperature, chunk_size)
    b, t, _ = student_logits.shape
    device = student_logits.device
    rows, cols = real_positions(labels, b, t, shift, ignore_index, device)
    denom = denominator(rows.numel(), num_real_tokens, device)
    ids, lp, rest = (x.detach().to(device) for x in (sparse.ids, sparse.logprobs, sparse.rest))
    if chunk_size is None:
        per = sparse_per_position_divergence(
            student_logits[rows, cols], ids[rows, cols], lp[rows, cols], rest[rows, cols], direction, beta, temperature
        )
        return per.sum() / denom
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    dtype = torch.promote_types(student_logits.dtype, torch.float32)

    def per_chunk(s, r, c):
        return sparse_per_position_divergence(s, ids[r, c], lp[r, c], rest[r, c], direction, beta, temperature)

    return _ChunkedSum.apply(student_logits, per_chunk, rows, cols, chunk_size, dtype, denom, needs_grad)


@torch.no_grad()
def topk_kl_error(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sparse: SparseLogprobs,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    shift: bool = True,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """How far a top-k teacher is from its dense logits, over the real positions of one batch.

    student_logits, teacher_logits (B, T, V); sparse the teacher's top-k at the same positions and temperature
    (from kdkit.data.lm_cache) → a dict of floats, means per real token:

        dense_kl     T² · KL(p ‖ q), the forward token loss with the dense teacher
        sparse_kl    T² · KL over the k + 1 buckets, the same loss with the top-k teacher (≤ dense_kl)
        abs_error    mean |sparse − dense| per token (= dense − sparse: coarsening never raises KL)
        rel_error    abs_error / dense_kl (0 when dense_kl is 0)
        teacher_kl   KL(p ‖ p̂) without T²: p̂ is the top-k distribution expanded back to V ids, the rest mass
                     spread evenly over the V − k other ids — how much of the teacher the cache loses
        topk_mass    mean Σ p over the top k (the stored ids' share of the teacher's mass)
        tokens       the number of real positions measured
    Computed chunk_size positions at a time, without gradients.
    """
    _check_sparse(student_logits, sparse)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} ≠ student {tuple(student_logits.shape)}")
    b, t, v = student_logits.shape
    device = student_logits.device
    rows, cols = real_positions(labels, b, t, shift, ignore_index, device)
    k = sparse.ids.shape[-1]
    sums = dict.fromkeys(("dense_kl", "sparse_kl", "abs_error", "teacher_kl", "topk_mass"), 0.0)
    for r, c in zip(rows.split(chunk_size), cols.split(chunk_size)):
        s, te = student_logits[r, c], teacher_logits[r, c]
        ids = sparse.ids[r, c].to(device).long()
        lp, rest = sparse.logprobs[r, c].to(device), sparse.rest[r, c].to(device)
        dense = per_position_divergence(s, te, "forward", temperature=temperature)
        coarse = sparse_per_position_divergence(s, ids, lp, rest, "forward", temperature=temperature)
        log_p = F.log_softmax(_upcast(te) / float(temperature), dim=-1)
        log_pb = _teacher_buckets(lp, rest, log_p.dtype)
        fill = log_pb[:, -1:] - math.log(max(v - k, 1))  # the rest mass shared evenly by the V − k other ids
        log_hat = fill.expand(-1, v).clone().scatter_(-1, ids, log_pb[:, :-1])
        sums["dense_kl"] += float(dense.sum())
        sums["sparse_kl"] += float(coarse.sum())
        sums["abs_error"] += float((coarse - dense).abs().sum())
        sums["teacher_kl"] += float(_kl(log_p, log_hat).sum())
        sums["topk_mass"] += float(log_p.gather(-1, ids).exp().sum())
    n = rows.numel()
    out = {key: val / max(n, 1) for key, val in sums.items()}
    out["rel_error"] = out["abs_error"] / out["dense_kl"] if out["dense_kl"] > 0 else 0.0
    out["tokens"] = n
    return out


# ----------------------------------------------------------------------------------------------------------------
# AdaSPEC's token filter: leave out the positions where the student is furthest from the teacher.
# ----------------------------------------------------------------------------------------------------------------


def drop_count(n_real: int, fraction: float) -> int:
    """How many of n_real positions a filter of `fraction` drops: floor(fraction × n_real).

    The product is rounded to 9 decimals before the floor, so that 0.29 × 100 (28.999999999999996 in floats)
    drops 29, not 28. With 0 ≤ fraction < 1 at least one position of a non-empty batch is kept.
    """
    return math.floor(round(fraction * n_real, 9))


@torch.no_grad()
def drop_hardest_labels(
    values_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None,
    batch: int,
    length: int,
    fraction: float,
    shift: bool = True,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, int, int]:
    """The labels without the hardest positions: (labels', kept, n_real).

    AdaSPEC (2025, "AdaSPEC: Selective Knowledge Distillation for Efficient Speculative Decoders") trains
    a draft model only on the tokens it can learn: the positions where it is furthest from the target are left out
    of the distillation loss, so that its small capacity goes to tokens it can match. Here: of the n_real positions
    that count (real_positions: labels ≠ ignore_index, after the shift), the drop_count(n_real, fraction) with the
    largest values_at(rows, cols) → (k,) (the per-position divergence: per_position_divergence or
    sparse_per_position_divergence at those positions) are dropped, by setting the label they are compared with
    to ignore_index (labels[b, t + 1] with shift, labels[b, t] without). Any token loss then called with labels'
    reads the kept positions only.

    values_at is called chunk_size positions at a time (all at once for None), under no_grad: the ranking adds no
    autograd graph. Ties: a stable descending sort, so among equal values the earlier position in row-major (b, t)
    order is dropped first. A NaN value ranks below every number: it is kept, so that a diverged student shows in
    the loss (and the engine's non-finite check) instead of being filtered out. Values computed with another chunk
    size can differ in the last bit, and so can the choice between near-equal positions.
    labels (B, T) or None (every position counts) → a new tensor (labels itself when nothing is dropped: fraction
    0, or a batch too small for floor(fraction × n_real) ≥ 1); kept = n_real − dropped.
    """
    rows, cols = real_positions(labels, batch, length, shift, ignore_index, device)
    n_real = rows.numel()
    n_drop = drop_count(n_real, fraction)
    if n_drop == 0:
        return labels, n_real, n_real
    step = chunk_size or n_real
    values = torch.cat([values_at(r, c) for r, c in zip(rows.split(step), cols.split(step))])
    values = torch.where(values.isnan(), -math.inf, values)
    drop = torch.sort(values, descending=True, stable=True).indices[:n_drop]
    if labels is None:  # every position counts: any label but ignore_index marks it
        kept = torch.zeros(batch, length, dtype=torch.long, device=rows.device)
    else:
        kept = labels.to(rows.device, copy=True)
    kept[rows[drop], cols[drop] + int(shift)] = ignore_index
    return kept, n_real - n_drop, n_real


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
