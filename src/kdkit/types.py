"""The shared vocabulary: what flows between data, models, teachers, losses and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Batch:
    """One mini-batch.

    inputs: (B, ...) model input; labels: (B,) int64 class ids; index: (B,) int64 positions of the samples in their
    data set (the teacher-output cache is keyed by it); attention_mask: (B, T) 1 for real tokens, 0 for padding
    (sequence inputs only), used by losses over hidden states and attention maps. After augmentation: view (B,)
    the augmented view of each example (the teacher-output cache keys stored views by it); with Mixup/CutMix the
    inputs mix each example with a partner whose labels are mixed_labels, in the proportion mix_lambda : 1 − mix_lambda.

    Language-model batches: inputs (B, T) token ids, right-padded; labels (B, T) the token ids themselves (losses
    shift them: logits at t predict labels at t + 1), -100 where a position must not be predicted (padding,
    prompts); attention_mask (B, T). num_real_tokens: () the global count of predicted tokens of the whole
    optimizer step (every micro-batch of the accumulation, every process), set by the engine; token losses divide
    by it so that the micro-batch losses of a step add up to the loss of the whole step. num_labelled_tokens: the
    same count without the shift (every label ≠ -100), for token losses with shift: false.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    attention_mask: torch.Tensor | None = None
    view: torch.Tensor | None = None
    mixed_labels: torch.Tensor | None = None
    mix_lambda: float = 1.0
    num_real_tokens: torch.Tensor | None = None
    num_labelled_tokens: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            move(self.inputs),
            move(self.labels),
            move(self.index),
            move(self.attention_mask),
            move(self.view),
            move(self.mixed_labels),
            self.mix_lambda,
            move(self.num_real_tokens),
            move(self.num_labelled_tokens),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModelOutputs:
    """What a student or a teacher produced for a batch.

    logits: (B, C) unnormalised scores, or (B, T, V) for a language model. For an ensemble that averages
    probabilities these are log-probabilities, which softmax maps back to the averaged probabilities.
    features: tapped activations by module path. sparse: a language-model teacher read from the top-k cache
    (kdkit.data.lm_cache) instead of dense logits; logits is then None. hidden, head: a language model's last hidden
    state (B, T, H) and its output layer (an nn.Linear) instead of its logits, for the fused token losses
    (kdkit.losses.fused_head); logits is then None and with_logits() makes them.
    alignment: a teacher with another tokenizer (kdkit.run.cross_teacher): its logits are over its own tokens of
    the batch's text, (B, T_teacher, V_teacher), and this kdkit.data.align.AlignedBatch says which of its positions
    and the student's have read the same text (typed loosely: types sits below data).
    groups: several teachers with tokenizers of their own (kdkit.run.teacher_groups): (weight, outputs) per group of
    members that share a tokenizer, the weights summing to 1; logits is then None, and a loss that reads the teacher
    counts as the weighted sum of its value against each group (kdkit.losses.combined).
    """

    logits: torch.Tensor | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    sparse: SparseLogprobs | None = None
    hidden: torch.Tensor | None = None
    head: torch.nn.Module | None = None
    alignment: Any = None
    groups: list = field(default_factory=list)

    def detach(self) -> ModelOutputs:
        return replace(
            self,
            logits=None if self.logits is None else self.logits.detach(),
            features={k: v.detach() for k, v in self.features.items()},
            hidden=None if self.hidden is None else self.hidden.detach(),
        )

    def with_logits(self) -> ModelOutputs:
        """These outputs with their logits: a language model that gave its last hidden state and head instead
        (kdkit.models.lm_head, for the fused token losses) gets head(hidden), for a loss that reads whole logits."""
        if self.logits is not None or self.hidden is None:
            return self
        w, b = self.head.weight, getattr(self.head, "bias", None)
        h = self.hidden
        logits = h @ w.to(h.dtype).t() if b is None else torch.addmm(b.to(h.dtype), h.flatten(0, -2), w.to(h.dtype).t())
        return replace(self, logits=logits.reshape(*h.shape[:-1], w.shape[0]), hidden=None, head=None)


@dataclass
class SparseLogprobs:
    """A teacher's next-token distribution kept as its k most likely tokens plus the rest.

    ids: (B, T, k) int64 token ids; logprobs: (B, T, k) float32 log-probabilities of those ids (at the cache's
    kd temperature); rest: (B, T) float32 log of the probability mass outside the top k (log(1 − Σ p_topk),
    stored, not recomputed, so that rounding cannot make it negative). Positions follow the logits: position t
    is the distribution over the token at t + 1.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    def to(self, device: torch.device | str) -> SparseLogprobs:
        return SparseLogprobs(self.ids.to(device), self.logprobs.to(device), self.rest.to(device))


@dataclass
class StepOutput:
    """The result of one training step: the total loss (with grad) and each named part before weighting (detached)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
