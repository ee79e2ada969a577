"""Decoupled knowledge distillation (Zhao et al. 2022): α·TCKD + β·NCKD, with the authors' warm-up."""

from __future__ import annotations

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, non_negative, positive
from kdkit.types import Batch, ModelOutputs


class DecoupledKD(Loss):
    """Fk.dkd(student logits, teacher logits, batch.labels) times the warm-up factor min(epoch / warmup_epochs, 1).

    warmup_epochs: the DKD term grows linearly from 0 over this many epochs (0: off). The authors' code (mdistiller
    `DKD.forward_train`) multiplies the loss by min(epoch / warmup, 1) with its 1-based integer epoch and warmup 20
    on CIFAR-100; kdkit uses the fractional epoch the engine passes to set_epoch() (0.0 at the first step), so the
    factor ramps every step instead of once per epoch and reaches 1 after warmup_epochs epochs.
    With Mixup/CutMix (batch.mixed_labels) the target class is mixed as the input is:
    lam · DKD(y) + (1 − lam) · DKD(y_mixed), as cross-entropy does (Zhang et al. 2018).
    """

    name = "dkd"
    needs_labels = True  # the target class of every example splits the distribution

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 0.0):
        super().__init__()
        self.alpha = non_negative("alpha", alpha)
        self.beta = non_negative("beta", beta)
        self.temperature = positive("temperature", temperature)
        self.warmup_epochs = non_negative("warmup_epochs", warmup_epochs)
        self.epoch = 0.0

    def set_epoch(self, epoch: float) -> None:
        self.epoch = float(epoch)

    def warmup_factor(self) -> float:
        return min(self.epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        loss = Fk.dkd(student.logits, teacher.logits, batch.labels, self.alpha, self.beta, self.temperature)
        if batch.mixed_labels is not None:
            mixed = Fk.dkd(student.logits, teacher.logits, batch.mixed_labels, self.alpha, self.beta, self.temperature)
            loss = batch.mix_lambda * loss + (1.0 - batch.mix_lambda) * mixed
        return self.warmup_factor() * loss

    def describe(self) -> str:
        warm = f", warm-up {self.warmup_epochs:g} ep" if self.warmup_epochs else ""
        return f"dkd(α={self.alpha:g}, β={self.beta:g}, T={self.temperature:g}{warm})"
