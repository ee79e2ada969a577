"""Decoupled knowledge distillation (Zhao et al. 2022): α·TCKD + β·NCKD."""

from __future__ import annotations

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs


class DecoupledKD(Loss):
    name = "dkd"

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0 or alpha < 0 or beta < 0:
            raise ValueError(f"alpha={alpha}, beta={beta}, temperature={temperature}; expected alpha, beta >= 0, T > 0")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        return Fk.dkd(student.logits, teacher.logits, batch.labels, self.alpha, self.beta, self.temperature)

    def describe(self) -> str:
        return f"dkd(α={self.alpha:g}, β={self.beta:g}, T={self.temperature:g})"
