"""The teacher as every torch task runs it: members frozen with the run's settings, and the live source the
engine calls when nothing is cached."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.teachers import Teacher
from kdkit.types import Batch, ModelOutputs


def frozen(model: nn.Module, distill, example: torch.Tensor, device: str, log=None) -> Teacher:
    """A model behind the frozen wrapper with the run's distill.teacher_precision, channels_last and teacher_fuse_bn
    (a fold is checked on `example`). Teacher members are wrapped here, and so are students when their cost is
    measured, so that both are timed the same way."""
    return Teacher.from_settings(model, precision=distill.teacher_precision, channels_last=distill.channels_last,
                                 fuse_bn=distill.teacher_fuse_bn, example=example, device=device, log=log,
                                 compile=distill.teacher_compile)


class LiveTeacher:
    """The teacher source the engine calls when nothing is cached: the frozen teacher on the batch's inputs.
    hidden: the loss takes hidden states (WeightedLoss.fuses_head), so a causal-LM teacher gives its last hidden
    state and head rather than its (B, T, V) logits (Teacher.hidden_forward)."""

    def __init__(self, teacher, hidden: bool = False):
        self.teacher = teacher
        self.hidden = hidden and hasattr(teacher, "hidden_forward")

    def __call__(self, batch: Batch) -> ModelOutputs:
        if self.hidden:
            return self.teacher.hidden_forward(batch.inputs)
        return self.teacher(batch.inputs)
