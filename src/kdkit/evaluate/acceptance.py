"""How often a target accepts a draft's tokens in speculative decoding, measured teacher-forced on text.

Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023) lets a small draft q propose k tokens that the target p checks in one forward pass; the output has exactly
the target's distribution. At one position, a token drawn from q is accepted with probability

    α = Σ_v min(p(v), q(v)) = 1 − TV(p, q)                    (Leviathan et al. 2023, Corollary 3.6)

and with k proposals per target call, if the acceptances were independent with rate α, one call yields

    E[tokens per target call] = Σ_{j=0..k} α^j = (1 − α^{k+1}) / (1 − α)     (Leviathan et al. 2023, eq. 1)

tokens (j = 0: the token the target produces itself). DistillSpec (Zhou et al. 2024, "DistillSpec: Improving
Speculative Decoding via Knowledge Distillation") trains the draft to raise α, i.e. to lower the TVD.
Greedy decoding (temperature 0) accepts a draft token iff it is the target's argmax: α = 1[argmax q = argmax p].

Conventions are those of kdkit.losses.token_functional: with shift=True the logits at position t predict token
t + 1, position t counts iff labels[b, t + 1] ≠ -100, and the last position never counts; only real positions are
gathered before any arithmetic (garbage logits elsewhere are never read); softmax in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from kdkit.losses.token_functional import real_positions


def token_acceptance(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    shift: bool = True,
    ignore_index: int = -100,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-position acceptance probability α[b, t], NaN where a position does not count. (B, T, V) ×2 → (B, T).

    temperature τ > 0: α = Σ_v min(p, q) with p = softmax(target / τ), q = softmax(draft / τ) — the probability
    that speculative sampling at temperature τ accepts the draft's token at this position, given the context.
    temperature 0 (greedy): α = 1 if argmax q = argmax p else 0 (ties: the first index, as torch.argmax and HF greedy).
    Positions that count follow the shift convention of the module docstring (labels None: every position, but the
    last with shift=True). chunk_size: real positions computed at a time (bounds the chunk_size × V float32 memory).
    The result is float32 (float64 for float64 logits); use mean_acceptance for the mean over real positions.
    """
    if draft_logits.dim() != 3 or draft_logits.shape != target_logits.shape:
        raise ValueError(
            f"draft_logits: shape {tuple(draft_logits.shape)}; expected (B, T, V) equal to target_logits' "
            f"{tuple(target_logits.shape)} (the same vocabulary)"
        )
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature: {temperature}; expected a finite number ≥ 0 (0: greedy)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size}; expected ≥ 1")
    b, t, _ = draft_logits.shape
    dtype = torch.promote_types(torch.promote_types(draft_logits.dtype, target_logits.dtype), torch.float32)
    alpha = torch.full((b, t), float("nan"), dtype=dtype, device=draft_logits.device)
    rows, cols = real_positions(labels, b, t, shift, ignore_index, draft_logits.device)
    with torch.no_grad():
        for r, c in zip(rows.split(chunk_size), cols.split(chunk_size)):
            alpha[r, c] = _acceptance(draft_logits[r, c].to(dtype), target_logits[r, c].to(dtype), temperature)
    return alpha


def _acceptance(draft: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """α for gathered rows (N, V) → (N,)."""
    if temperature == 0:
        return (draft.argmax(-1) == target.argmax(-1)).to(draft.dtype)
    q = F.softmax(draft / temperature, dim=-1)
    p = F.softmax(target / temperature, dim=-1)
    return torch.minimum(p, q).sum(-1).clamp(0.0, 1.0)  # Σ min ≤ 1 up to rounding


def mean_acceptance(alpha: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The mean of α over the real positions (mask True; mask None: the non-NaN entries), each position weighing
    the same. No real position: ValueError."""
    keep = _mask(alpha, mask)
    if not keep.any():
        raise ValueError("alpha: no real position (every entry is NaN or masked)")
    return float(alpha[keep].double().mean())


def expected_accepted_length(
    alpha: torch.Tensor, k: int, mask: torch.Tensor | None = None, horizon: int | None = None
) -> float:
    """Expected tokens per target call when the draft proposes k tokens, estimated teacher-forced along the text.

    For each start t of a row, the draft proposes the tokens at positions t, t+1, …, t+k−1; the target accepts them
    in order, the i-th with probability α[t+i], stops at the first rejection, and always adds one token of its own:

        E_t = Σ_{j=0..k} Π_{i<j} α[t+i]          (the j = 0 term is 1: the target's own token)

    The result is the mean of E_t over the starts whose k positions t … t+k−1 are all real (mask True; mask None:
    non-NaN). Near the end of a row (or before a masked gap) a start with fewer than k real positions ahead is not
    counted: the last k − 1 real positions of a run enter only as later terms of earlier starts, so no start is
    scored with a shorter draft than k. horizon ≥ k counts only the starts with `horizon` real positions ahead, so
    that the values for several k are means over the same starts (acceptance_curve: the largest k), and grow with
    k. No such start: ValueError.

    For a constant α this is (1 − α^{k+1}) / (1 − α) (Leviathan et al. 2023, eq. 1); α = 1 gives k + 1, α = 0 gives
    1. It treats the acceptances along the text as the ones along the target's own decoding: exact in expectation
    only on text the target generated itself (DistillSpec measures there), an estimate on other text. It averages
    over every start, while decoding visits only the starts right after each call's accepted block.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: {k!r}; expected an integer ≥ 1 (draft tokens per target call)")
    if alpha.dim() != 2:
        raise ValueError(f"alpha: shape {tuple(alpha.shape)}; expected (B, T)")
    keep = _mask(alpha, mask)
    a = torch.where(keep, alpha, 0.0).double()
    h = k if horizon is None else horizon
    if isinstance(h, bool) or not isinstance(h, int) or h < k:
        raise ValueError(f"horizon: {horizon!r}; expected an integer ≥ k = {k}")
    if a.shape[1] < h:
        raise ValueError(f"k: {h}; alpha has only {a.shape[1]} positions per row")
    windows = a.unfold(1, h, 1)[..., :k]  # (B, T − h + 1, k): α[t], …, α[t+k−1]
    full = keep.unfold(1, h, 1).all(-1)  # (B, T − h + 1): starts with h real positions ahead
    if not full.any():
        raise ValueError(f"k: {h}; no start has {h} consecutive real positions ahead (longest run: {_longest(keep)})")
    lengths = 1.0 + windows.cumprod(-1).sum(-1)  # 1 + Σ_{j=1..k} Π_{i<j} α[t+i]
    return float(lengths[full].mean())


def acceptance_curve(
    alpha: torch.Tensor, ks: Iterable[int] = range(1, 9), mask: torch.Tensor | None = None
) -> dict[int, float]:
    """{k: expected_accepted_length(alpha, k)} for each k in ks (default 1 … 8), every k over the same starts (those
    with max(ks) real positions ahead), so that the curve grows with k."""
    ks = [int(k) for k in ks]
    return {k: expected_accepted_length(alpha, k, mask, horizon=max(ks)) for k in ks}


def _mask(alpha: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The positions that count: mask (bool, alpha's shape), or alpha's non-NaN entries."""
    if mask is None:
        return ~torch.isnan(alpha)
    if mask.shape != alpha.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)}; expected alpha's {tuple(alpha.shape)}")
    return mask.to(torch.bool) & ~torch.isnan(alpha)


def _longest(keep: torch.Tensor) -> int:
    """The longest run of consecutive True along any row of keep (B, T)."""
    best = 0
    for row in keep.tolist():
        run = 0
        for x in row:
            run = run + 1 if x else 0
            best = max(best, run)
    return best
