"""Soft-label distillation: KL(teacher ‖ student) at temperature T, scaled by T² (Hinton et al. 2015)."""

from __future__ import annotations

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, positive
from kdkit.types import Batch, ModelOutputs


class SoftKL(Loss):
    name = "soft_kl"

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = positive("temperature", temperature)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        return Fk.soft_kl(student.logits, teacher.logits, self.temperature)

    def describe(self) -> str:
        return f"soft_kl(T={self.temperature:g})"
