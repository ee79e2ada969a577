"""The shared vocabulary: what flows between data, models, teachers, losses and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Batch:
    """One mini-batch.

    inputs: (B, ...) model input; labels: (B,) int64 class ids; index: (B,) int64 positions of the samples in their
    data set (the teacher-output cache is keyed by it); attention_mask: (B, T) 1 for real tokens, 0 for padding
    (sequence inputs only), used by losses over hidden states and attention maps. After augmentation: view (B,)
    the augmented view of each example (the teacher-output cache keys stored views by it); with Mixup/CutMix the
    inputs mix each example with a partner whose labels are mixed_labels, in the proportion mix_lambda : 1 − mix_lambda.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    attention_mask: torch.Tensor | None = None
    view: torch.Tensor | None = None
    mixed_labels: torch.Tensor | None = None
    mix_lambda: float = 1.0

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
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModelOutputs:
    """What a student or a teacher produced for a batch.

    logits: (B, C) unnormalised scores. For an ensemble that averages probabilities these are log-probabilities,
    which softmax maps back to the averaged probabilities. features: tapped activations by module path.
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> ModelOutputs:
        return replace(self, logits=self.logits.detach(), features={k: v.detach() for k, v in self.features.items()})


@dataclass
class StepOutput:
    """The result of one training step: the total loss (with grad) and each named part before weighting (detached)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
