"""How fast speculative decoding with a draft can be on this machine, and which k makes it fastest.

One round of speculative decoding costs k draft steps and one target pass over k + 1 new tokens, and yields
E(k) = Σ_{j=0..k} α^j tokens on average (Leviathan et al. 2023, eq. 1; kdkit.evaluate.acceptance estimates E(k)
from text). Against the target alone, which pays one target step per token, the expected speed-up is

    S(k) = E(k) · t_target / (k · t_draft + t_verify(k))

Leviathan et al. (Theorem 3.8) take t_verify(k) = t_target, which holds where a forward pass is bound by reading
the weights (a GPU at batch 1). On a CPU a pass over k + 1 tokens costs visibly more than over one, so
t_verify(k) is measured here for every k, as are t_target and t_draft: one forward pass of k + 1 (or 1) new tokens
after a prompt held in the model's KV cache, the cache cropped back after each pass. The costs leave out what the
generation loop adds per round (HF's candidate bookkeeping), so S(k) is an upper bound for HF assisted generation
on this machine; compare it with the measured speed-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class DecodeCosts:
    """Seconds per forward pass with a KV cache: the target and the draft for one new token, the target for k + 1
    new tokens (verify[k])."""

    target_token_s: float
    draft_token_s: float
    verify_s: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "target_token_ms": round(1e3 * self.target_token_s, 3),
            "draft_token_ms": round(1e3 * self.draft_token_s, 3),
            "draft_cost_ratio": round(self.draft_token_s / self.target_token_s, 4),
            "verify_ms": {str(k): round(1e3 * v, 3) for k, v in self.verify_s.items()},
        }


def step_seconds(model: nn.Module, prompt: list[int], new_tokens: int, repeats: int = 5) -> float:
    """The median seconds of one forward pass of `new_tokens` tokens after `prompt`, held in the KV cache (cropped
    back after each pass, so every pass sees the same cache); one untimed pass first."""
    if not prompt:
        raise ValueError("prompt: empty; expected at least one token id to fill the KV cache")
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens: {new_tokens}, repeats: {repeats}; expected both ≥ 1")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new = ids[:, -1:].repeat(1, new_tokens)  # any ids: the cost does not depend on which
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        # transformers 5.x names the cache `cache` (argument and output), 4.x `past_key_values`
        name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
        cache = getattr(out, name)
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(new, use_cache=True, **{name: cache})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
            cache.crop(-new_tokens)  # negative: remove that many (4.x and 5.x alike)
    return statistics.median(times)


def measure_decode_costs(target: nn.Module, draft: nn.Module, prompt: list[int], ks: Iterable[int],
                         repeats: int = 5) -> DecodeCosts:
    """t_target, t_draft (one new token each) and t_verify(k) (the target over k + 1 new tokens) after `prompt`."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks: {ks}; expected draft token counts ≥ 1")
    return DecodeCosts(
        target_token_s=step_seconds(target, prompt, 1, repeats),
        draft_token_s=step_seconds(draft, prompt, 1, repeats),
        verify_s={k: step_seconds(target, prompt, k + 1, repeats) for k in ks},
    )


def expected_speedup(tokens_per_call: float, k: int, costs: DecodeCosts) -> float:
    """S(k) = E(k) · t_target / (k · t_draft + t_verify(k)) (module docstring)."""
    if k not in costs.verify_s:
        raise ValueError(f"k: {k}; costs were measured for k in {sorted(costs.verify_s)}")
    return tokens_per_call * costs.target_token_s / (k * costs.draft_token_s + costs.verify_s[k])


def speedup_by_k(curve: dict, costs: DecodeCosts) -> dict[int, float]:
    """{k: S(k)} for every k of `curve` ({k: E(k)}, keys int or str) that the costs cover."""
    return {int(k): expected_speedup(float(e), int(k), costs) for k, e in curve.items() if int(k) in costs.verify_s}


def best_k(curve: dict, costs: DecodeCosts) -> tuple[int, float]:
    """(k, S(k)) with the largest expected speed-up; ties go to the smaller k."""
    speed = speedup_by_k(curve, costs)
    if not speed:
        raise ValueError("curve: no k that the costs cover")
    k = min(speed, key=lambda k: (-speed[k], k))
    return k, speed[k]
