"""Generation for sequence-level and on-policy distillation of language models.

- Sequence-level KD (Kim & Rush 2016): the teacher completes prompts (`generate`), the completions are stored as
  JSONL (`write_generations` / `read_generations`) and the student trains on prompt + completion with the loss on
  the completion only (`sequence_kd_examples`).
- On-policy KD (GKD, Agarwal et al. 2024; TRL's GKDTrainer with `lmbda`): for a fraction λ of batches the student
  continues the first tokens of each row itself and the teacher scores that continuation (`OnPolicy`), so the
  student learns from its own mistakes instead of only from teacher-forced prefixes.

Generation is Hugging Face `model.generate` with LEFT padding (every prompt ends at the same column, so the first
new token of each row is predicted from that row's last real token) and an attention mask; kdkit's training
batches stay right-padded. Sampling is reproducible: a seed fixes the draws, and the global RNG of the training
run is left as it was.

Sampling settings are named `sampling_temperature` and `top_p`: `sampling_temperature` shapes the distribution the
tokens are drawn from; it is not the distillation temperature of a KL loss (`kd_temperature`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.atomic import write_text
from kdkit.errors import DataError
from kdkit.types import Batch

IGNORE = -100  # label of a position that is not predicted


@dataclass(frozen=True)
class GenerationSettings:
    """How to continue a prompt.

    sampling_temperature: > 0 when do_sample (ignored when greedy); top_p: nucleus sampling, 0 < top_p ≤ 1 (1 keeps
    the whole distribution); max_new_tokens: ≥ 1, and prompt + max_new_tokens must fit the model's context
    (`check_fits`); do_sample: False for greedy decoding. Top-k filtering is off (as in GKD). Invalid values raise
    ValueError with a one-line message that names the field (the config layer turns it into a ConfigError).
    """

    sampling_temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    do_sample: bool = True

    def __post_init__(self):
        t = self.sampling_temperature
        if self.do_sample and not (isinstance(t, int | float) and math.isfinite(t) and t > 0):
            raise ValueError(f"sampling_temperature: {t!r}; expected a number > 0 when do_sample is true")
        p = self.top_p
        if not (isinstance(p, int | float) and 0 < p <= 1):
            raise ValueError(f"top_p: {p!r}; expected 0 < top_p <= 1")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_new_tokens: {m!r}; expected an integer >= 1")

    def check_fits(self, prompt_length: int, context_length: int) -> None:
        """ValueError unless prompt_length + max_new_tokens ≤ context_length."""
        room = context_length - prompt_length
        if self.max_new_tokens > room:
            raise ValueError(
                f"max_new_tokens: {self.max_new_tokens}; a prompt of {prompt_length} tokens leaves room for at most "
                f"{max(room, 0)} new tokens in the model's context of {context_length}"
            )


def context_length_of(model: nn.Module) -> int | None:
    """The longest sequence the model takes (max_position_embeddings, or n_positions for GPT-2); None if unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@contextmanager
def _eval_seeded(model: nn.Module, seed: int):
    """Eval mode, no grad, RNG seeded by `seed`; afterwards the model's mode and the global RNG state are restored
    (a training run's dropout and data order must not depend on whether it generated)."""
    was_training = model.training
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model.eval()
        try:
            with torch.no_grad():
                yield device
        finally:
            model.train(was_training)


def _generation_kwargs(settings: GenerationSettings, pad_id: int, eos_id: int | None) -> dict[str, Any]:
    # Every knob is set explicitly: generate() fills unset ones from the model's generation_config (a checkpoint's
    # repetition_penalty, top_k=50, ...), which would make the same settings sample differently per model.
    sampling = (
        {"temperature": float(settings.sampling_temperature), "top_p": float(settings.top_p), "top_k": 0}
        if settings.do_sample
        else {}  # greedy: sampling knobs are ignored, and transformers warns about any that is set
    )
    return {
        "do_sample": settings.do_sample,
        **sampling,
        "repetition_penalty": 1.0,
        "num_beams": 1,
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": 0,
        "pad_token_id": int(pad_id),
        "eos_token_id": None if eos_id is None else int(eos_id),
        "use_cache": True,
    }


def _cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Up to and including the first eos: the student learns to stop, and what generate padded after it goes."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    pad_id: int,
    eos_id: int | None,
    seed: int = 0,
    batch_size: int = 8,
    context_length: int | None = None,
) -> list[list[int]]:
    """Completion token ids for each prompt (prompt excluded; ends with eos_id if the model emitted it, nothing after).

    prompts: lists of token ids (non-empty). Prompts go through `model.generate` in batches of `batch_size`, left-padded
    with pad_id under an attention mask, in eval mode without grad; the model's train/eval mode is restored after.
    Deterministic for a seed and batch_size (greedy decoding also does not depend on batch_size). context_length:
    default the model's max_position_embeddings / n_positions. ValueError for an empty prompt list, an empty prompt, a
    prompt that does not leave room for max_new_tokens in the context, or batch_size < 1.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts: empty; expected at least one prompt to generate from")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size}; expected >= 1")
    context = context_length if context_length is not None else context_length_of(model)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}]: empty; a prompt needs at least one token")
        if context is not None:
            if len(p) > context:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens, longer than the model's context of {context} tokens")
            settings.check_fits(len(p), context)
    kwargs = _generation_kwargs(settings, pad_id, eos_id)
    completions: list[list[int]] = []
    with _eval_seeded(model, seed) as device:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for row in out[:, width:].tolist():
                completions.append(_cut_at_eos(row, eos_id))
    return completions


def _right_pad(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(inputs, labels, attention_mask), each (B, T) int64; pads get pad_id, label -100 and mask 0."""
    width = max(len(s) for s in seqs)
    inputs = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (s, y) in enumerate(zip(seqs, labels)):
        inputs[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        lab[row, : len(y)] = torch.tensor(y, dtype=torch.long)
        mask[row, : len(s)] = 1
    return inputs, lab, mask


def sequence_kd_examples(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, block: int
) -> list[dict[str, torch.Tensor]]:
    """Training examples for sequence-level KD: {"input_ids": (L,), "labels": (L,)} int64 with L ≤ block.

    input_ids = prompt + completion; labels = input_ids with -100 on the prompt (only the completion is predicted;
    losses shift, so the first completion token is predicted from the last prompt token). Too long: the prompt is
    cut from its start (the context nearest the completion is kept), then the completion at its end. An empty
    completion predicts nothing and gives no example. The examples are unpadded (the collator pads them with
    pad_id); pad_id is taken so that the call reads like OnPolicy's and is not otherwise used: a completion from
    `generate` has no padding (it ends at eos), and when pad_id == eos_id its final token is that eos.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"completions: {len(completions)} for {len(prompts)} prompts; expected one per prompt")
    if block < 2:
        raise ValueError(f"block: {block}; expected at least 2 tokens (one prompt token and one predicted token)")
    examples = []
    for prompt, completion in zip(prompts, completions):
        prompt, completion = list(map(int, prompt)), list(map(int, completion))
        if not completion:
            continue
        completion = completion[: block - 1]
        prompt = prompt[max(0, len(prompt) - (block - len(completion))) :]
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
        examples.append(
            {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        )
    return examples


def write_generations(
    path: str | Path, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], tokenizer: Any = None
) -> Path:
    """JSONL, one record per prompt: {"prompt_ids", "completion_ids", "prompt", "completion"} (texts decoded with
    `tokenizer`, special tokens kept; null without a tokenizer). Written atomically."""
    if len(prompts) != len(completions):
        raise ValueError(f"completions: {len(completions)} for {len(prompts)} prompts; expected one per prompt")
    lines = []
    for prompt, completion in zip(prompts, completions):
        prompt, completion = list(map(int, prompt)), list(map(int, completion))
        record = {
            "prompt_ids": prompt,
            "completion_ids": completion,
            "prompt": tokenizer.decode(prompt) if tokenizer is not None else None,
            "completion": tokenizer.decode(completion) if tokenizer is not None else None,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return write_text(path, "".join(line + "\n" for line in lines))


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The records of write_generations; a DataError naming the file and line for a missing file or a bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"generations: {str(path)!r} not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = all(
                isinstance(record.get(k), list) and all(isinstance(t, int) for t in record[k])
                for k in ("prompt_ids", "completion_ids")
            )
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok:
            raise DataError(
                f"generations: {str(path)!r} line {number} is not a record with integer lists prompt_ids and "
                "completion_ids"
            )
        records.append(record)
    if not records:
        raise DataError(f"generations: {str(path)!r} holds no records")
    return records


def _unit_hash(*parts: int) -> float:
    """A number in [0, 1) fixed by `parts` (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class OnPolicy:
    """On-policy batches for GKD: `on_policy(batch, student, step=None) -> batch`.

    For a fraction `fraction` (λ) of batches, each row's first `prompt_tokens` real tokens become a prompt, the
    student continues it (generate: eval mode, no grad, its train mode restored), and the returned Batch holds
    prompt + continuation right-padded: labels -100 on the prompt and on the padding after eos, attention_mask 1 on
    real tokens, the same index. The other batches come back unchanged (the same object). Rows shorter than
    prompt_tokens use all their real tokens as the prompt.

    Which batches are replaced is fixed by (seed, step) — the engine passes its optimizer-step counter, so every
    micro-batch of a step decides alike and a resumed run makes the same choices — or, without a step, by (seed,
    batch.index): the same examples in the same order give the same decision. What is sampled is fixed by the same
    key and batch.index, never by the global RNG.
    """

    def __init__(
        self,
        fraction: float,
        settings: GenerationSettings,
        prompt_tokens: int,
        pad_id: int,
        eos_id: int | None,
        seed: int = 0,
        context_length: int | None = None,
    ):
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction: {fraction!r}; expected 0 <= λ <= 1 (the share of on-policy batches)")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: {prompt_tokens!r}; expected >= 1")
        if context_length is not None:
            settings.check_fits(prompt_tokens, context_length)
        self.fraction, self.settings, self.prompt_tokens = float(fraction), settings, int(prompt_tokens)
        self.pad_id, self.eos_id, self.seed, self.context_length = int(pad_id), eos_id, int(seed), context_length

    def _key(self, batch: Batch, step: int | None) -> tuple[int, ...]:
        if step is not None:
            return (self.seed, 0, int(step))
        return (self.seed, 1, *batch.index.view(-1).tolist())

    def chosen(self, batch: Batch, step: int | None = None) -> bool:
        """Whether this batch is replaced by student generations (deterministic; λ=0 never, λ=1 always)."""
        return _unit_hash(*self._key(batch, step)) < self.fraction

    def __call__(self, batch: Batch, student: nn.Module, step: int | None = None) -> Batch:
        if not self.chosen(batch, step):
            return batch
        inputs = batch.inputs
        real = batch.attention_mask if batch.attention_mask is not None else (inputs != self.pad_id)
        lengths = real.long().sum(dim=1).tolist()
        prompts = [inputs[row, : min(self.prompt_tokens, n)].tolist() for row, n in enumerate(lengths) if n > 0]
        if len(prompts) != len(lengths):
            raise ValueError("batch: a row has no real tokens; expected at least one prompt token per row")
        # The sampling seed follows the step and the examples (micro-batches of one step sample independently), so
        # a resumed run draws the same continuations.
        seed = int(_unit_hash(*self._key(batch, step), 2, *batch.index.view(-1).tolist()) * 2**31)
        model = getattr(student, "module", student)  # a DDP-wrapped student generates through its module
        completions = generate(
            model,
            prompts,
            self.settings,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            seed=seed,
            batch_size=len(prompts),
            context_length=self.context_length,
        )
        seqs = [p + c for p, c in zip(prompts, completions)]
        labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)]
        new_inputs, new_labels, mask = _right_pad(seqs, labels, self.pad_id)
        device = inputs.device
        return Batch(new_inputs.to(device), new_labels.to(device), batch.index, attention_mask=mask.to(device))
