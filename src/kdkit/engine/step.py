"""One distillation step's forward: the student on the batch, the weighted loss against the teacher's outputs."""

from __future__ import annotations

from torch import nn

from kdkit.losses import WeightedLoss
from kdkit.models.lm_head import fusable_head, hidden_outputs
from kdkit.types import Batch, ModelOutputs, StepOutput


def distill_step(
    student: nn.Module, loss: WeightedLoss, batch: Batch, teacher: ModelOutputs | None, taps=None
) -> StepOutput:
    """Forward only; the loop does backward and the optimizer step (so accumulation stays in one place).
    `taps` (FeatureTaps on the student) supplies the activations that feature losses read.
    A causal LM whose loss takes hidden states (WeightedLoss.fuses_head) gives its last hidden state and head
    instead of its (B, T, V) logits (kdkit.models.lm_head, kdkit.losses.fused_head)."""
    student_out = None
    head = fusable_head(student) if loss.fuses_head else None
    if head is not None:
        student_out = hidden_outputs(student, batch.inputs, head)
    if student_out is None:
        out = student(batch.inputs)
        student_out = out if isinstance(out, ModelOutputs) else ModelOutputs(logits=getattr(out, "logits", out))
    if taps is not None:
        student_out.features.update(taps.collect())
    return loss(student_out, teacher, batch)
