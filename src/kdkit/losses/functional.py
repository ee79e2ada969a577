"""The mathematics of kdkit's losses as pure functions: tensors in, a scalar tensor out.

Every function computes in fp32 (logits are upcast first: a softmax in bf16/fp16 loses the small probabilities
that distillation transfers) and averages over the batch ("batchmean"), which is the KL divergence per example.
The teacher is a fixed target: its logits are detached, so no gradient ever reaches the teacher, even when a caller
passes logits that require grad (the real Teacher runs under inference_mode; a test may not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy with the true labels over the labelled examples. logits: (B, C); labels: (B,) int64,
    `ignore_index` for an unlabelled example (a transfer-set text that only the teacher labels).

        L = (1/|S|) Σ_{b ∈ S} CE(z_b, y_b),   S = {b : y_b ≠ ignore_index}

    A batch without labels gives 0 (with a gradient of zeros), not the NaN of an empty mean."""
    keep = labels != ignore_index
    per_example = F.cross_entropy(
        logits.float(), labels.masked_fill(~keep, 0), label_smoothing=label_smoothing, reduction="none"
    )
    return (per_example * keep).sum() / keep.sum().clamp_min(1)


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


# ---------------------------------------------------------------------------------------------------------------
# Feature losses. Student features arrive already mapped to the teacher's shape (kdkit.models.adapters); teacher
# features are detached targets. Masks are (B, T) with 1 for real tokens and 0 for padding; masked means divide by
# the global count of real tokens in the batch (not a mean of per-example means), so padding never dilutes a loss.
# ---------------------------------------------------------------------------------------------------------------


def _target(teacher_feat: torch.Tensor) -> torch.Tensor:
    """The teacher's tensor as a detached fp32 target that autograd may save (an inference tensor is cloned)."""
    t = teacher_feat.detach().float()
    return t.clone() if t.is_inference() else t


def _check_same_shape(s: torch.Tensor, t: torch.Tensor, what: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{what}: student shape {tuple(s.shape)} ≠ teacher shape {tuple(t.shape)}")


def _token_mask(mask: torch.Tensor, feat: torch.Tensor, what: str) -> torch.Tensor:
    """(B, T) mask → bool, checked against the first two dims of `feat` (B, T, ...)."""
    if mask.dim() != 2 or feat.dim() < 2 or tuple(mask.shape) != tuple(feat.shape[:2]):
        raise ValueError(f"{what}: mask of shape {tuple(mask.shape)} does not fit features {tuple(feat.shape)}")
    return mask.to(device=feat.device, dtype=torch.bool)


def feature_mse(
    student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """FitNets hint loss, Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR), eq. 3.

        L = (1/N) Σ (r(s) − t)²

    the mean squared error between the (adapted) student hint r(s) and the teacher's hint t. The paper writes
    ½‖·‖² summed over the hint; kdkit takes the element mean (as mdistiller/torchdistill do) so the scale does not
    grow with the feature size. Shapes: any (B, ...), equal on both sides → ().
    With mask (B, T) for (B, T, D) features only real tokens count: N = (number of real tokens) · D.
    """
    s, t = student_feat.float(), _target(teacher_feat)
    _check_same_shape(s, t, "feature_mse")
    sq = (s - t).pow(2)
    if mask is None:
        return sq.mean()
    if s.dim() != 3:
        raise ValueError(f"feature_mse: a token mask needs (B, T, D) features; got {tuple(s.shape)}")
    m = _token_mask(mask, s, "feature_mse").unsqueeze(-1)  # (B, T, 1)
    total = torch.where(m, sq, torch.zeros((), device=sq.device)).sum()
    return total / (m.sum() * s.shape[-1]).clamp_min(1)


def attention_map(feat: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Activation-based spatial attention, Zagoruyko & Komodakis 2017, "Paying More Attention to Attention" (ICLR).

        a(x) = vec( mean_c |x_c|^p ) / ‖ vec( mean_c |x_c|^p ) ‖₂

    the channel mean of |activation|^p at each position, flattened over H·W and L2-normalised per example.
    `size` (H', W'): resize the map (before normalising) with bilinear interpolation. (B, C, H, W) → (B, H·W).
    """
    if feat.dim() != 4:
        raise ValueError(f"attention_map: expected (B, C, H, W) features; got {tuple(feat.shape)}")
    a = feat.float().abs().pow(p).mean(dim=1)  # (B, H, W)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return F.normalize(a.flatten(1), p=2.0, dim=1)


def attention_transfer(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: float = 2.0, beta: float = 1000.0
) -> torch.Tensor:
    """Attention transfer (AT), Zagoruyko & Komodakis 2017, eq. 2, as the authors' code computes it:

        L = (β/2) · Σ_j mean_{b, i} ( a(s_j)_{b,i} − a(t_j)_{b,i} )²

    over pairs j of (student, teacher) feature maps, with a() from `attention_map`. The paper writes the norm
    ‖a_s − a_t‖_p per example; its reference code (attention-transfer `at_loss`) squares the difference and takes
    the mean over the batch and the H·W positions, and the training script adds `beta / 2 * sum(at_losses)` with
    `--beta 1e+3`. kdkit follows the code: β = 1000 gives the published scale; β = 2 gives the bare sum of means.
    Channels may differ (the map averages them). When spatial sizes differ, the student's map is resized to the
    teacher's (H, W) with bilinear interpolation before normalising (the teacher's map is never touched).
    Shapes: lists of (B, C_s, H_s, W_s) and (B, C_t, H_t, W_t) → ().
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"attention_transfer: {len(student_feats)} student vs {len(teacher_feats)} teacher maps")
    total = torch.zeros((), device=student_feats[0].device)
    for s, t in zip(student_feats, teacher_feats):
        t = _target(t)
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(f"attention_transfer: expected (B, C, H, W) pairs; got {tuple(s.shape)}, {tuple(t.shape)}")
        a_t = attention_map(t, p)
        a_s = attention_map(s, p, size=tuple(t.shape[-2:]))
        total = total + (a_s - a_t).pow(2).mean()
    return total * (beta / 2.0)


def hidden_state_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "mse"
) -> torch.Tensor:
    """Hidden-state distillation between paired transformer layers (TinyBERT, Jiao et al. 2020, eq. 8;
    DistilBERT, Sanh et al. 2019, cosine embedding loss).

        mse:    L = Σ_{real b,τ} Σ_d (s − t)² / (N_real · D)
        cosine: L = Σ_{real b,τ} (1 − cos(s_{b,τ}, t_{b,τ})) / N_real

    over real tokens only when mask (B, T) is given (else over all tokens). Student states must already be
    projected to the teacher's width. Shapes: (B, T, D), (B, T, D) → ().
    """
    s, t = student_hidden.float(), _target(teacher_hidden)
    _check_same_shape(s, t, "hidden_state_loss")
    if s.dim() != 3:
        raise ValueError(f"hidden_state_loss: expected (B, T, D) hidden states; got {tuple(s.shape)}")
    if kind == "mse":
        return feature_mse(s, t, mask)
    if kind != "cosine":
        raise ValueError(f"hidden_state_loss: kind={kind!r}; expected 'mse' or 'cosine'")
    per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)  # (B, T)
    if mask is None:
        return per_token.mean()
    m = _token_mask(mask, s, "hidden_state_loss")
    return torch.where(m, per_token, torch.zeros((), device=s.device)).sum() / m.sum().clamp_min(1)


def _match_heads(s: torch.Tensor, t: torch.Tensor, head_reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring (B, H_s, T, T) and (B, H_t, T, T) to one head count by averaging probabilities of adjacent heads."""
    h_s, h_t = s.shape[1], t.shape[1]
    if head_reduce == "all" or (h_s != h_t and h_t % h_s and h_s % h_t):
        return s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
    if h_t > h_s:  # teacher heads in H_s contiguous groups of H_t / H_s
        t = t.unflatten(1, (h_s, h_t // h_s)).mean(dim=2)
    elif h_s > h_t:
        s = s.unflatten(1, (h_t, h_s // h_t)).mean(dim=2)
    return s, t


def attention_map_kl(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None = None,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """Self-attention distribution transfer (MiniLM, Wang et al. 2020, eq. 1; TinyBERT's attention loss compares
    the same maps with MSE).

        L = (1 / (H · N_real)) Σ_{b, h, real q} Σ_k A^t_{bhqk} (log A^t_{bhqk} − log A^s_{bhqk})

    KL(teacher ‖ student) of each query row's distribution over keys, summed over keys, averaged over heads and
    over the real query tokens of the batch. Inputs are attention probabilities (rows sum to 1), (B, H, T, T).
    mask (B, T): padded query rows are excluded; padded key columns are zeroed on both sides and each row is
    renormalised (safe division), so the padding's leftover mass cannot count. Rows are always renormalised,
    which also absorbs the 1/(1−p) scaling of attention dropout; log 0 is clamped to log(float32 tiny), a
    finite value, and 0·log 0 = 0.
    Head counts: head_reduce="mean" (default) keeps the heads when H_s = H_t; when one divides the other the
    larger side's heads are averaged in contiguous groups (teacher heads 0..g−1 → group 0, ...) down to the
    smaller count; otherwise all heads are averaged to one map on both sides. head_reduce="all" always averages
    all heads to one map per side. Computed in fp32.
    """
    if head_reduce not in ("mean", "all"):
        raise ValueError(f"attention_map_kl: head_reduce={head_reduce!r}; expected 'mean' or 'all'")
    s, t = student_attn.float(), _target(teacher_attn)
    square = s.dim() == 4 and s.shape[2] == s.shape[3]
    if not square or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(
            f"attention_map_kl: expected (B, H, T, T) maps with equal B and T; got {tuple(s.shape)}, {tuple(t.shape)}"
        )
    s, t = _match_heads(s, t, head_reduce)
    tiny = torch.finfo(torch.float32).tiny
    m = None
    if mask is not None:
        m = _token_mask(mask, s[:, 0], "attention_map_kl")  # (B, T)
        keys = m[:, None, None, :]
        s = s.masked_fill(~keys, 0.0)
        t = t.masked_fill(~keys, 0.0)
    s = s / s.sum(dim=-1, keepdim=True).clamp_min(tiny)
    t = t / t.sum(dim=-1, keepdim=True).clamp_min(tiny)
    kl = (torch.xlogy(t, t) - t * s.clamp_min(tiny).log()).sum(dim=-1)  # (B, H, T)
    if m is None:
        return kl.mean()
    queries = m[:, None, :].expand_as(kl)
    return torch.where(queries, kl, torch.zeros((), device=kl.device)).sum() / queries.sum().clamp_min(1)


PEER_TARGETS = ("pairwise", "mean_of_peers")


def mutual_learning(
    peer_logits: list[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    peer_target: str = "pairwise",
    mixed_labels: torch.Tensor | None = None,
    mix_lambda: float = 1.0,
) -> torch.Tensor:
    """Deep mutual learning, Zhang et al. 2018, "Deep Mutual Learning" (CVPR), for K ≥ 2 peers trained together:

        L = Σ_k [ CE(z_k, y) + kd_weight · T² · D_k ],   p_j = softmax(z_j / T), the others held constant (detached)

        pairwise (the paper, eq. 10):  D_k = 1/(K − 1) · Σ_{l ≠ k} KL( p_l ‖ p_k )
        mean_of_peers:                 D_k = KL( p̄_{−k} ‖ p_k ),   p̄_{−k} = 1/(K − 1) · Σ_{l ≠ k} p_l

    For K = 2 both are KL(p_other ‖ p_k). For K ≥ 3 they differ: KL is convex in its first argument, so
    mean_of_peers ≤ pairwise; it matches the other peers' ensemble (their mean distribution) as one teacher, the
    alternative the paper discusses beside eq. 10, instead of each peer. Each peer learns from the labels and from
    its peers' current predictions; gradients reach each peer only through its own terms. CE skips unlabelled
    examples (-100).
    With Mixup/CutMix, CE(z_k, y) becomes mix_lambda · CE(z_k, y) + (1 − mix_lambda) · CE(z_k, mixed_labels);
    the peers' predictions are on the same mixed input, so the KL terms stay as they are.
    Shapes: K × (B, C), (B,) → ().
    """
    if peer_target not in PEER_TARGETS:
        raise ValueError(f"peer_target={peer_target!r}; expected one of {', '.join(PEER_TARGETS)}")
    t = float(temperature)
    probs = [F.softmax(z.detach().float() / t, dim=-1) for z in peer_logits]
    total = torch.zeros((), device=labels.device)
    for k, z in enumerate(peer_logits):
        log_q = F.log_softmax(z.float() / t, dim=-1)
        others = [p for j, p in enumerate(probs) if j != k]
        if peer_target == "pairwise":
            kl = torch.stack([F.kl_div(log_q, p, reduction="batchmean") for p in others]).mean()
        else:
            kl = F.kl_div(log_q, torch.stack(others).mean(0), reduction="batchmean")
        ce = cross_entropy(z, labels)
        if mixed_labels is not None:
            ce = mix_lambda * ce + (1.0 - mix_lambda) * cross_entropy(z, mixed_labels)
        total = total + ce + kd_weight * kl * (t * t)
    return total
