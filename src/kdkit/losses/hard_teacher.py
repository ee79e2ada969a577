"""Hard distillation: cross-entropy with the teacher's top-1 class as the label."""

from __future__ import annotations

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs


class HardTeacher(Loss):
    name = "hard_teacher"

    def __init__(self) -> None:
        # Spelled out so that build_loss binds parameters against an empty signature and rejects any with a
        # ConfigError; inherited, nn.Module.__init__(*args, **kwargs) would accept them and fail later with a TypeError.
        super().__init__()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        return Fk.hard_teacher(student.logits, teacher.logits)
