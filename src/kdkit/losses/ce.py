"""Cross-entropy with the true labels; unlabelled examples (label -100, a transfer set) are left out of the mean."""

from __future__ import annotations

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, number
from kdkit.types import Batch, ModelOutputs


class CrossEntropy(Loss):
    name = "ce"
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = number("label_smoothing", label_smoothing, lambda v: 0 <= v < 1, "0 <= value < 1")

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        ce = Fk.cross_entropy(student.logits, batch.labels, self.label_smoothing)
        if batch.mixed_labels is None:
            return ce
        # Mixup/CutMix: the input is lam·x_i + (1 − lam)·x_j, so is the label (Zhang et al. 2018).
        mixed = Fk.cross_entropy(student.logits, batch.mixed_labels, self.label_smoothing)
        return batch.mix_lambda * ce + (1.0 - batch.mix_lambda) * mixed

    def describe(self) -> str:
        return f"ce(smoothing={self.label_smoothing:g})" if self.label_smoothing else "ce"
