"""One distillation step's forward: the student on the batch, the weighted loss against the teacher's outputs."""

from __future__ import annotations

from torch import nn

from kdkit.losses import WeightedLoss
from kdkit.types import Batch, ModelOutputs, StepOutput


def distill_step(
    student: nn.Module, loss: WeightedLoss, batch: Batch, teacher: ModelOutputs | None, taps=None
) -> StepOutput:
    """Forward only; the loop does backward and the optimizer step (so accumulation stays in one place).
    `taps` (FeatureTaps on the student) supplies the activations that feature losses read."""
    out = student(batch.inputs)
    student_out = out if isinstance(out, ModelOutputs) else ModelOutputs(logits=getattr(out, "logits", out))
    if taps is not None:
        student_out.features.update(taps.collect())
    return loss(student_out, teacher, batch)
