"""Span likelihood matching across tokenizers: how likely each aligned span of text is under teacher and student.

An aligned span (kdkit.data.align) is the same text on both sides, a whole number of tokens of each tokenizer, after
the same preceding text. By the chain rule each model gives it a likelihood, the product of its tokens'
conditional probabilities:

    ll_teacher(span) = Σ_{i ∈ span's teacher tokens} log p_teacher(x_i | x_<i),   ll_student likewise.

These are comparable across tokenizers (up to each model's other tokenisations of the same text, which they ignore),
unlike the next-token distributions. Each span's likelihoods are compared as two Bernoulli distributions, "this
span follows" or not (the binarised KL of ALM, Minixhofer et al. 2025, "Cross-Tokenizer Distillation via Approximate
Likelihood Matching", arXiv 2503.20083; ALM's debiasing of chunk outcomes and its choice of chunks are not
reproduced: this is kdkit's formulation):

    a = exp(ll_teacher / τ),   b = exp(ll_student / τ)
    D(span) = KL(Bern(a) ‖ Bern(b)) = a · log(a / b) + (1 − a) · log((1 − a) / (1 − b))

computed in log space (log(1 − e^x) by log1mexp). τ ≥ 1 softens long spans, whose likelihoods are tiny (ALM's
temperature); there is no T² factor (τ divides log-likelihoods, not logits). D is zero iff the likelihoods agree;
at τ = 1, by data processing, it never exceeds the KL between the two models' distributions over what follows.
Log-likelihoods
are capped at −1e-6 (a span certain in float32, log-likelihood 0, would make log(1 − b) = −∞).

The loss is Σ D over real spans / N, N = their number (or num_real). A span that contains a sequence's first token
on either side is left out: no position predicts that token (add a BOS token to give it one). The teacher's
log-probabilities are detached.

A teacher read from the offline cache across tokenizers (kdkit.data.cross_cache) has no logits: the cache stores the
log-probability it gave each of its realised tokens at temperature 1 (what token_logprobs computes), and the teacher
source sends them as teacher.features[TEACHER_TOKEN_LOGPROBS] (B, T_teacher), so the loss stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkit.data.align import AlignedBatch
from kdkit.losses import token_functional as Ft
from kdkit.losses.base import Loss, positive
from kdkit.losses.uld import alignment_of
from kdkit.types import Batch, ModelOutputs

TEACHER_TOKEN_LOGPROBS = "token_logprobs"  # teacher.features key: token_logprobs of the teacher's ids, from a cache
LOG_CAP = -1e-6  # the highest log-likelihood a span may have: 1 − e^x stays > 0


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_i | x_<i) of each input token under a causal LM: (B, T, V), (B, T) → (B, T) float32.

    Position i reads the logits at i − 1 (the causal shift); position 0 has no prediction and is 0 (span_loglik's
    callers leave out spans that contain it). Computed as z[x] − logsumexp(z) in float32 (float64 kept)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not fit input_ids {tuple(input_ids.shape)}")
    z = Ft._upcast(logits[:, :-1])
    nxt = input_ids[:, 1:].to(z.device).long().unsqueeze(-1)
    lp = z.gather(-1, nxt).squeeze(-1) - z.logsumexp(-1)
    return F.pad(lp, (1, 0))


def span_loglik(token_lp: torch.Tensor, token_span: torch.Tensor, n_spans: int) -> torch.Tensor:
    """Σ of the token log-probs of each span: (B, T), (B, T) span numbers (−1: no span) → (B, n_spans)."""
    index = torch.where(token_span >= 0, token_span, n_spans).to(token_lp.device)
    out = torch.zeros(token_lp.shape[0], n_spans + 1, dtype=token_lp.dtype, device=token_lp.device)
    return out.scatter_add(1, index, token_lp)[:, :n_spans]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate at both ends (Mächler 2012): log(−expm1 x) near 0, log1p(−e^x) below −ln 2."""
    half = -math.log(2)
    # Each branch gets inputs inside its own range, so the branch torch.where discards has no inf/NaN gradient.
    near = torch.log(-torch.expm1(x.clamp_min(half)))
    far = torch.log1p(-torch.exp(x.clamp_max(half)))
    return torch.where(x > half, near, far)


def binary_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bern(a) ‖ Bern(b)) elementwise from log a, log b ≤ LOG_CAP."""
    a = log_a.exp()
    return a * (log_a - log_b) + (1 - a) * (log1mexp(log_a) - log1mexp(log_b))


def _first_token_spans(token_span: torch.Tensor, n_spans: int) -> torch.Tensor:
    """(B, n_spans) bool: the span that holds token 0 of each row (no position predicts it)."""
    first = token_span[:, 0]
    hit = torch.zeros(token_span.shape[0], n_spans + 1, dtype=torch.bool, device=token_span.device)
    hit[torch.arange(token_span.shape[0], device=token_span.device), torch.where(first >= 0, first, n_spans)] = True
    return hit[:, :n_spans]


def span_likelihood_loss(
    student_token_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    student_span: torch.Tensor,
    teacher_span: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    num_real: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ over real spans of KL(Bern(exp(ll_t / τ)) ‖ Bern(exp(ll_s / τ))) / N (module docstring).

    student_token_logprobs (B, T_s), teacher_token_logprobs (B, T_t): token_logprobs of each side's input ids;
    student_span, teacher_span (B, T_s), (B, T_t) and mask (B, S): SpanIndex.student_span, teacher_span, mask.
    N = the number of real spans left (mask, without the spans holding a first token), or num_real."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    n_spans = mask.shape[1]
    device = student_token_logprobs.device
    keep = mask.to(device) & ~_first_token_spans(student_span.to(device), n_spans)
    keep = keep & ~_first_token_spans(teacher_span.to(device), n_spans)
    ll_s = span_loglik(Ft._upcast(student_token_logprobs), student_span.to(device), n_spans)[keep]
    ll_t = span_loglik(Ft._upcast(teacher_token_logprobs.detach()).to(device), teacher_span.to(device), n_spans)[keep]
    tau = float(temperature)
    per_span = binary_kl((ll_t / tau).clamp_max(LOG_CAP), (ll_s / tau).clamp_max(LOG_CAP))
    return per_span.sum() / Ft.denominator(per_span.numel(), num_real, device)


class SpanLikelihood(Loss):
    """span_likelihood_loss over the aligned spans; the token log-probs come from each side's logits and input ids
    (the AlignedBatch's encodings). temperature: τ dividing span log-likelihoods (no T²)."""

    name = "span_likelihood"
    cross_tokenizer = True  # reads a teacher with another tokenizer through the alignment (kdkit.run.cross_teacher)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = positive("temperature", temperature)

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: Batch,
        alignment: AlignedBatch | None = None,
        num_real_tokens: int | torch.Tensor | None = None,
    ):
        aligned = alignment_of(self, batch, alignment, teacher)
        index = aligned.index
        device = student.logits.device
        if teacher.logits is not None:
            teacher_lp = token_logprobs(teacher.logits.detach(), aligned.teacher.input_ids.to(teacher.logits.device))
        elif TEACHER_TOKEN_LOGPROBS in teacher.features:  # the offline cache across tokenizers
            teacher_lp = teacher.features[TEACHER_TOKEN_LOGPROBS]
        else:
            raise ValueError(
                f"{self.name}: the teacher gave neither logits nor its tokens' log-probs "
                f"(features[{TEACHER_TOKEN_LOGPROBS!r}]); expected the live teacher or the cache across tokenizers"
            )
        return span_likelihood_loss(
            token_logprobs(student.logits, aligned.student.input_ids.to(device)),
            teacher_lp,
            index.student_span,
            index.teacher_span,
            index.mask,
            self.temperature,
            num_real_tokens,
        )

    def describe(self) -> str:
        return f"span_likelihood(tau={self.temperature:g})"
