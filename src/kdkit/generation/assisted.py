"""Speculative decoding end to end: Hugging Face's assisted generation with a draft, its speed-up and its acceptance.

Assisted generation (transformers' `generate(..., assistant_model=draft)`) runs in rounds: the draft proposes up to
k tokens, then the target runs once over all of them, keeps the draft's tokens up to the first one it rejects, and
adds one token of its own (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").
Greedy (do_sample=False) the target rejects a draft token that is not its own argmax, so the output is the target's
own greedy output token for token; compare_assisted checks that on every output it times. Sampling
(do_sample=True) the target accepts a draft token x with probability min(1, p(x) / q(x)) and replaces the first
rejected one by a sample of max(p − q, 0), so the output is distributed as the target's own samples;
sampled_acceptance measures how often it accepts. transformers supports it for batch 1 only.

In transformers 5.x the number of draft tokens is read from the *draft's* generation_config
(`num_assistant_tokens`, with `num_assistant_tokens_schedule` and `assistant_confidence_threshold`), not from the
arguments of the target's generate(). assisted_generate sets them on a copy for the call (k fixed: schedule
"constant", no confidence early stop) and puts the draft's own config back afterwards. Sampling, it passes the
temperature as a logits processor rather than generation_config.temperature, which transformers 5.x applies to the
draft twice (the draft would sample at T²: lossless still, but it accepts less than it should; see _full_softmax).

What is counted, per generate() call (both compare_assisted and sampled_acceptance):

- target calls: forward calls of the target, one per round (counted by a forward hook);
- drafted tokens: the tokens the draft proposed, summed over rounds: k per round, fewer only near the length
  limit (transformers lets the draft propose at most max_new_tokens − generated − 1, so the target's own token
  always fits: no round is cut by the limit, and a round with one token left has no draft tokens) or when the
  draft proposes eos. They are read from the draft's own generate() output each round; the draft runs one
  forward call per proposed token (checked in the tests);
- accepted tokens: the drafted tokens the target kept. A round keeps its first n draft tokens and then one token
  of the target's that differs from the draft's next one (greedy: the target's argmax where they disagree;
  sampling: max(p − q, 0) is 0 at the rejected token), so n is the length of the common prefix of the round's draft
  and the final output. Hence new tokens = accepted + target calls, except a run that ends on an eos the draft
  proposed and the target accepted: transformers drops the target's token after it, and new tokens = accepted +
  target calls − 1 (transformers' own n_matches then says one fewer; we count the eos as accepted);
- verified tokens: the drafted tokens the target decided on, each round's up to and including its first rejected
  one; the rest of the round is discarded without being looked at.

acceptance = accepted / drafted, the share of the draft's work that was kept. accepted / verified
(`verified_acceptance`) is the per-position acceptance rate, comparable to the teacher-forced Σ min(p, q) of
kdkit.evaluate.acceptance; with a rate α at every position, tokens per target call = (1 − α^(k+1)) / (1 − α) away
from the length limit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AssistedComparison:
    """What compare_assisted measured. Tokens/s are new tokens over wall-clock seconds, summed over every timed run.

    speedup: assisted_tokens_per_s / target_tokens_per_s. tokens_per_target_call: new tokens per forward call of
    the target with the draft (1 for the target alone; at most k + 1). target_calls, drafted_tokens,
    verified_tokens, accepted_tokens: summed over the timed assisted runs, as defined in the module docstring;
    acceptance: accepted / drafted (0 when nothing was drafted). mismatches: the indices of the prompts whose
    assisted output differed from the target's own greedy output in some run (empty: identical everywhere).
    target_outputs: the target's own greedy new tokens for each prompt (the last repeat's), the text to score a
    draft on teacher-forced.
    """

    k: int
    max_new_tokens: int
    repeats: int
    new_tokens: int
    target_tokens_per_s: float
    assisted_tokens_per_s: float
    speedup: float
    tokens_per_target_call: float
    target_calls: int
    drafted_tokens: int
    verified_tokens: int
    accepted_tokens: int
    acceptance: float
    mismatches: list[int] = field(default_factory=list)
    target_outputs: list[list[int]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.mismatches

    @property
    def verified_acceptance(self) -> float:
        """accepted / verified: the per-position acceptance rate (0 when nothing was verified)."""
        return _share(self.accepted_tokens, self.verified_tokens)


@dataclass(frozen=True)
class SampledAcceptance:
    """What sampled_acceptance measured over all prompts (one sampled assisted run each): tokens and rates as in
    the module docstring. acceptance: accepted / drafted (0 when nothing was drafted); tokens_per_target_call: new
    tokens per forward call of the target."""

    k: int
    temperature: float
    new_tokens: int
    target_calls: int
    drafted_tokens: int
    verified_tokens: int
    accepted_tokens: int
    acceptance: float
    tokens_per_target_call: float

    @property
    def verified_acceptance(self) -> float:
        """accepted / verified: the per-position acceptance rate (0 when nothing was verified)."""
        return _share(self.accepted_tokens, self.verified_tokens)


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
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[int]:
    """The new token ids of generation by `target` from input_ids (1, T), assisted by `draft` (None: the target
    alone, the reference), proposing num_assistant_tokens (k) tokens per target call. Greedy by default; do_sample:
    sampled from the full softmax at `temperature` (top_k=0, top_p=1), speculative sampling with a draft, drawn
    from torch's global RNG (seed it for repeatable draws).

    Calls target.generate(input_ids, assistant_model=draft, do_sample=..., max_new_tokens=...) with the draft's
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
    _check_temperature(temperature)
    config = target.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    ids = input_ids.to(target.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=bool(do_sample),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if do_sample:
        kwargs.update(_full_softmax(temperature))
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
    """Tokens/s of the target alone and of target + draft (k draft tokens per call), greedy, batch 1, on `prompts`,
    and the acceptance measured in the assisted runs (drafted, verified and accepted tokens: module docstring).

    After one untimed warm-up of each on the first prompt, every repeat runs each prompt with both, back to back,
    the one that goes first alternating from run to run (neither always runs on a warmer cache). Each assisted
    output is compared with the target's own output of the same run: a difference raises AssistedMismatch when
    strict (naming the prompt, the repeat and the first differing position), otherwise it is listed in the result's
    mismatches. Target forward calls are counted with a forward hook. speedup is assisted over target-alone tokens/s,
    each total new tokens over total seconds: a wall-clock figure of whatever machine and load this runs on.
    """
    check_pair(target, draft, k)
    _check_prompts(prompts)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: {repeats!r}; expected an integer ≥ 1")
    inputs = [torch.tensor([p], dtype=torch.long) for p in prompts]

    def run(model: torch.nn.Module | None, ids: torch.Tensor) -> tuple[list[int], float, _Rounds]:
        with _recording(target, model) as rounds:
            start = time.perf_counter()
            out = assisted_generate(target, model, ids, max_new_tokens, k, eos_token_id)  # .tolist() syncs CUDA
            return out, time.perf_counter() - start, rounds

    run(None, inputs[0])
    run(draft, inputs[0])
    seconds = {"target": 0.0, "assisted": 0.0}
    tokens = {"target": 0, "assisted": 0}
    counts = {"calls": 0, "drafted": 0, "verified": 0, "accepted": 0}
    mismatches: list[int] = []
    target_outputs: list[list[int]] = []
    for r in range(repeats):
        for i, ids in enumerate(inputs):
            order = ("target", "assisted") if (r + i) % 2 == 0 else ("assisted", "target")
            outs = {}
            for mode in order:
                outs[mode], sec, rounds = run(draft if mode == "assisted" else None, ids)
                seconds[mode] += sec
                tokens[mode] += len(outs[mode])
                if mode == "assisted":
                    _add(counts, rounds, prompts[i] + outs[mode])
            if r == repeats - 1:
                target_outputs.append(outs["target"])
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
        tokens_per_target_call=tokens["assisted"] / max(counts["calls"], 1),
        target_calls=counts["calls"],
        drafted_tokens=counts["drafted"],
        verified_tokens=counts["verified"],
        accepted_tokens=counts["accepted"],
        acceptance=_share(counts["accepted"], counts["drafted"]),
        mismatches=mismatches,
        target_outputs=target_outputs,
    )


def sampled_acceptance(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    k: int,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
) -> SampledAcceptance:
    """Speculative sampling's acceptance end to end: HF assisted generation with do_sample at `temperature` (the
    full softmax: top_k=0, top_p=1), k draft tokens per target call, batch 1, each prompt once, untimed.

    Prompt i is sampled after torch.manual_seed(seed + i), so the same arguments give the same figures; the caller's
    RNG state (CPU, and the target's CUDA device) is put back afterwards. Sampled outputs are not compared with the
    target's own (they are random). With a draft equal to the target (q = p) every draft token is accepted, up to
    float rounding between the draft's one-token forwards and the target's many-token forward.
    """
    check_pair(target, draft, k)
    _check_prompts(prompts)
    _check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r}; expected an integer")
    counts = {"calls": 0, "drafted": 0, "verified": 0, "accepted": 0}
    new_tokens = 0
    with _forked_rng(target.device):
        for i, prompt in enumerate(prompts):
            torch.manual_seed(seed + i)
            ids = torch.tensor([prompt])
            with _recording(target, draft) as rounds:
                out = assisted_generate(
                    target, draft, ids, max_new_tokens, k, eos_token_id, do_sample=True, temperature=temperature
                )
            new_tokens += len(out)
            _add(counts, rounds, prompt + out)
    return SampledAcceptance(
        k=k,
        temperature=float(temperature),
        new_tokens=new_tokens,
        target_calls=counts["calls"],
        drafted_tokens=counts["drafted"],
        verified_tokens=counts["verified"],
        accepted_tokens=counts["accepted"],
        acceptance=_share(counts["accepted"], counts["drafted"]),
        tokens_per_target_call=new_tokens / max(counts["calls"], 1),
    )


@dataclass
class _Rounds:
    """One assisted generate() call, recorded while it ran: the target's forward calls, and each round's draft
    tokens with the position of the first one in the whole sequence (prompt + new tokens)."""

    target_calls: int = 0
    drafts: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def counts(self, sequence: list[int]) -> tuple[int, int, int]:
        """(drafted, verified, accepted) given the final sequence: a round's accepted tokens are the common prefix
        of its draft and the sequence from its position, its verified ones that plus the rejected one, if any."""
        drafted = verified = accepted = 0
        for start, tokens in self.drafts:
            proposed = tokens.tolist()
            kept = next((j for j, (a, b) in enumerate(zip(proposed, sequence[start:])) if a != b), None)
            n = min(len(proposed), len(sequence) - start) if kept is None else kept
            drafted += len(proposed)
            accepted += n
            verified += min(n + 1, len(proposed))
        return drafted, verified, accepted


@contextmanager
def _recording(target: torch.nn.Module, draft: torch.nn.Module | None) -> Iterator[_Rounds]:
    """Count the target's forward calls (a forward hook) and keep each round's draft tokens while the block runs.

    transformers' candidate generator asks the draft for each round's tokens with draft.generate(...) and reads
    the output's sequences and scores (one score per proposed token); an instance attribute wraps that method for
    the block and is removed afterwards. The tensors are kept as they are (no device sync inside a timed run).
    """
    rounds = _Rounds()

    def count(*_) -> None:
        rounds.target_calls += 1

    hook = target.register_forward_hook(count)
    if draft is not None:
        own = vars(draft).get("generate")  # a caller's own wrapper, if any, is put back afterwards
        generate = draft.generate

        def record(*args, **kwargs):
            out = generate(*args, **kwargs)
            n = len(out.scores)
            if n:
                rounds.drafts.append((out.sequences.shape[1] - n, out.sequences[0, -n:]))
            return out

        draft.generate = record
    try:
        yield rounds
    finally:
        hook.remove()
        if draft is not None and own is None:
            del draft.generate  # back to the class's method
        elif draft is not None:
            draft.generate = own


def _add(counts: dict[str, int], rounds: _Rounds, sequence: list[int]) -> None:
    drafted, verified, accepted = rounds.counts(sequence)
    counts["calls"] += rounds.target_calls
    counts["drafted"] += drafted
    counts["verified"] += verified
    counts["accepted"] += accepted


def _forked_rng(device: torch.device):
    """The global RNG of the CPU (and of `device` when it is an accelerator), put back after the block."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _full_softmax(temperature: float) -> dict:
    """generate() arguments that sample from softmax(logits / temperature), nothing cut (transformers' default
    top_k is 50; a model's generation_config may set top_p, min_p or typical_p).

    The temperature goes in as a logits processor, generation_config.temperature stays 1: in transformers 5.x
    the candidate generator hands the draft the target's processors, warpers included, and the draft's generate()
    appends the warpers of its generation_config (a copy of the target's) after them, so a config temperature T
    is applied to the draft twice (it samples and is judged at T², and accepts less than it should; the output
    is still distributed as the target's at T). A processor passed in is merged, not appended: applied once.
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    return dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        logits_processor=LogitsProcessorList([TemperatureLogitsWarper(float(temperature))]),
    )


def _check_prompts(prompts: list[list[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: empty, or an empty prompt; expected non-empty lists of token ids")


def _check_temperature(temperature: float) -> None:
    ok = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: {temperature!r}; expected a finite number > 0 (the sampling temperature)")


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


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
