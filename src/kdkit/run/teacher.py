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
                                 fuse_bn=distill.teacher_fuse_bn, example=example, device=device, log=log)


class LiveTeacher:
    """The teacher source the engine calls when nothing is cached: the frozen teacher on the batch's inputs."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, batch: Batch) -> ModelOutputs:
        return self.teacher(batch.inputs)
