"""Speculative decoding end to end: Hugging Face's assisted generation with a draft, and its speed-up, checked.

Assisted generation (transformers' `generate(..., assistant_model=draft)`) runs the draft for k tokens, then the
target once over all k, and keeps the draft's tokens up to the first one the target would not have chosen, plus the
target's own next token (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").
Greedy (do_sample=False), its output is the target's own greedy output token for token; compare_assisted checks
that on every output it times. transformers supports it for batch 1 only.

In transformers 5.x the number of draft tokens is read from the *draft's* generation_config
(`num_assistant_tokens`, with `num_assistant_tokens_schedule` and `assistant_confidence_threshold`), not from the
arguments of the target's generate(). assisted_generate sets them on a copy for the call (k fixed: schedule
"constant", no confidence early stop) and puts the draft's own config back afterwards.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AssistedComparison:
    """What compare_assisted measured. Tokens/s are new tokens over wall-clock seconds, summed over every timed run.

    speedup: assisted_tokens_per_s / target_tokens_per_s. tokens_per_target_call: new tokens per forward call of
    the target with the draft (1 for the target alone; at most k + 1). mismatches: the indices of the prompts whose
    assisted output differed from the target's own greedy output in some run (empty: identical everywhere).
    """

    k: int
    max_new_tokens: int
    repeats: int
    new_tokens: int
    target_tokens_per_s: float
    assisted_tokens_per_s: float
    speedup: float
    tokens_per_target_call: float
    mismatches: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.mismatches


class AssistedMismatch(RuntimeError):
    """Greedy assisted generation gave an output that differs from the target's own greedy output."""


def check_pair(target: torch.nn.Module, draft: torch.nn.Module, num_assistant_tokens: int) -> None:
    """One-line ValueErrors for a draft that cannot assist this target: another vocabulary size (another tokenizer),
    more parameters than the target, or num_assistant_tokens not an integer ≥ 1."""
    k = num_assistant_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_assistant_tokens: {k!r}; expected an integer ≥ 1 (draft tokens per target call)")
    t_vocab, d_vocab = _vocab_size(target), _vocab_size(draft)
    if d_vocab != t_vocab:
        raise ValueError(f"draft vocab_size: {d_vocab}; expected the target's {t_vocab} (the same tokenizer)")
    t_params, d_params = _params(target), _params(draft)
    if d_params > t_params:
        raise ValueError(f"draft parameters: {d_params:,}; expected at most the target's {t_params:,}")


def assisted_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    num_assistant_tokens: int = 4,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> list[int]:
    """The new token ids of greedy generation by `target` from input_ids (1, T), assisted by `draft` (None: the
    target alone, the reference), proposing num_assistant_tokens (k) tokens per target call.

    Calls target.generate(input_ids, assistant_model=draft, do_sample=False, max_new_tokens=...) with the draft's
    generation_config swapped for a copy holding num_assistant_tokens=k, num_assistant_tokens_schedule="constant"
    and assistant_confidence_threshold=0 (no early stop), so every round proposes exactly k tokens (fewer only at
    the length limit) and repeated calls do not adapt k between them. eos_token_id / pad_token_id None: the
    target's generation_config (pad falls back to eos). Generation stops at eos or after max_new_tokens.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids: shape {tuple(input_ids.shape)}; expected (1, T), batch 1 (HF assisted generation)"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens!r}; expected an integer ≥ 1")
    config = target.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    ids = input_ids.to(target.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if draft is None:
        with torch.inference_mode():
            return target.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()
    check_pair(target, draft, num_assistant_tokens)
    own = draft.generation_config
    draft.generation_config = copy.deepcopy(own)
    draft.generation_config.num_assistant_tokens = num_assistant_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    try:
        with torch.inference_mode():
            out = target.generate(ids, assistant_model=draft, **kwargs)
    finally:
        draft.generation_config = own
    return out[0, ids.shape[1] :].tolist()


def compare_assisted(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    k: int,
    repeats: int = 3,
    strict: bool = True,
    eos_token_id: int | list[int] | None = None,
) -> AssistedComparison:
    """Tokens/s of the target alone and of target + draft (k draft tokens per call), greedy, batch 1, on `prompts`.

    After one untimed warm-up of each on the first prompt, every repeat runs each prompt with both, back to back,
    the one that goes first alternating from run to run (neither always runs on a warmer cache). Each assisted
    output is compared with the target's own output of the same run: a difference raises AssistedMismatch when
    strict (naming the prompt, the repeat and the first differing position), otherwise it is listed in the result's
    mismatches. Target forward calls are counted with a forward hook. speedup is assisted over target-alone tokens/s,
    each total new tokens over total seconds: a wall-clock figure of whatever machine and load this runs on.
    """
    check_pair(target, draft, k)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: empty, or an empty prompt; expected non-empty lists of token ids")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: {repeats!r}; expected an integer ≥ 1")
    inputs = [torch.tensor([p], dtype=torch.long) for p in prompts]

    def run(model: torch.nn.Module | None, ids: torch.Tensor) -> tuple[list[int], float, int]:
        calls = [0]
        hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            start = time.perf_counter()
            out = assisted_generate(target, model, ids, max_new_tokens, k, eos_token_id)  # .tolist() syncs CUDA
            return out, time.perf_counter() - start, calls[0]
        finally:
            hook.remove()

    run(None, inputs[0])
    run(draft, inputs[0])
    seconds = {"target": 0.0, "assisted": 0.0}
    tokens = {"target": 0, "assisted": 0}
    assisted_calls = 0
    mismatches: list[int] = []
    for r in range(repeats):
        for i, ids in enumerate(inputs):
            order = ("target", "assisted") if (r + i) % 2 == 0 else ("assisted", "target")
            outs = {}
            for mode in order:
                outs[mode], sec, calls = run(draft if mode == "assisted" else None, ids)
                seconds[mode] += sec
                tokens[mode] += len(outs[mode])
                assisted_calls += calls if mode == "assisted" else 0
            if outs["assisted"] != outs["target"]:
                if strict:
                    raise AssistedMismatch(_describe(i, r, outs["target"], outs["assisted"]))
                if i not in mismatches:
                    mismatches.append(i)
    target_rate = tokens["target"] / max(seconds["target"], 1e-12)
    assisted_rate = tokens["assisted"] / max(seconds["assisted"], 1e-12)
    return AssistedComparison(
        k=k,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        new_tokens=tokens["target"],
        target_tokens_per_s=target_rate,
        assisted_tokens_per_s=assisted_rate,
        speedup=assisted_rate / target_rate,
        tokens_per_target_call=tokens["assisted"] / max(assisted_calls, 1),
        mismatches=mismatches,
    )


def _describe(prompt: int, repeat: int, expected: list[int], got: list[int]) -> str:
    at = next((j for j, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (
        f"prompts[{prompt}] (repeat {repeat}): assisted output differs from the target's greedy output at new token "
        f"{at} ({got[at : at + 1]} vs {expected[at : at + 1]}; lengths {len(got)} vs {len(expected)})"
    )


def _vocab_size(model: torch.nn.Module) -> int:
    config = model.config
    return int(config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
