"""The mathematics of kdkit's losses as pure functions: tensors in, a scalar tensor out.

Every function computes in fp32 (logits are upcast first: a softmax in bf16/fp16 loses the small probabilities
that distillation transfers) and averages over the batch ("batchmean"), which is the KL divergence per example.
The teacher is a fixed target: its logits are detached, so no gradient ever reaches the teacher, even when a caller
passes logits that require grad (the real Teacher runs under inference_mode; a test may not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy with the true labels. logits: (B, C); labels: (B,) int64."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

        L = T² · (1/B) Σ_b KL( softmax(t_b / T) ‖ softmax(s_b / T) )

    KL direction: the teacher's distribution p is the target, KL(p‖q) = Σ p (log p − log q). The T² factor keeps
    the gradient's magnitude independent of T (the soft gradients scale as 1/T²). Shapes: (B, C), (B, C) → ().
    """
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl * (t * t)


def hard_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the teacher's argmax as the label ("hard distillation", Touvron et al. 2021)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD, Zhao et al. 2022, "Decoupled Knowledge Distillation" (CVPR).

    KD splits into a target-class part and a non-target part:

        TCKD = T² · KL( [p_t, 1 − p_t] ‖ [q_t, 1 − q_t] )          (binary: target vs the rest)
        NCKD = T² · KL( p̂ ‖ q̂ ),  p̂_i = p_i / (1 − p_t) over the non-target classes i ≠ t
        L    = α · TCKD + β · NCKD

    with p = softmax(teacher / T), q = softmax(student / T), t the true class; each KL is averaged over the batch.
    Shapes: (B, C), (B, C), (B,) → ().
    """
    t = float(temperature)
    s, te = student_logits.float() / t, teacher_logits.detach().float() / t
    target = F.one_hot(labels, s.shape[-1]).bool()  # (B, C)
    log_q, log_p = F.log_softmax(s, dim=-1), F.log_softmax(te, dim=-1)
    # Binary distributions [target, rest] in log space: log(1 - p_t) computed as logsumexp over the others.
    neg_inf = torch.finfo(torch.float32).min
    log_q_t = log_q.masked_fill(~target, neg_inf).logsumexp(-1)
    log_q_rest = log_q.masked_fill(target, neg_inf).logsumexp(-1)
    log_p_t = log_p.masked_fill(~target, neg_inf).logsumexp(-1)
    log_p_rest = log_p.masked_fill(target, neg_inf).logsumexp(-1)
    bin_q = torch.stack([log_q_t, log_q_rest], dim=-1)
    bin_p = torch.stack([log_p_t, log_p_rest], dim=-1)
    tckd = F.kl_div(bin_q, bin_p, reduction="batchmean", log_target=True)
    # Non-target distributions: softmax over the non-target logits (the target is removed, not down-weighted).
    log_q_nt = F.log_softmax(s.masked_fill(target, neg_inf), dim=-1)
    log_p_nt = F.log_softmax(te.masked_fill(target, neg_inf), dim=-1)
    p_nt = log_p_nt.exp()
    nckd = (p_nt * (log_p_nt - log_q_nt)).masked_fill(target, 0.0).sum(-1).mean()
    return (alpha * tckd + beta * nckd) * (t * t)
