"""The total loss: an explicit weighted sum of named parts."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs, StepOutput


class WeightedLoss(nn.Module):
    """total = Σ weight_i · loss_i. Weights are explicit: there is no hidden (1 − α) complement."""

    def __init__(self, terms: list[tuple[float, Loss]]):
        super().__init__()
        if not terms:
            raise ValueError("a WeightedLoss needs at least one term")
        self.weights = [float(w) for w, _ in terms]
        self.parts = nn.ModuleList([loss for _, loss in terms])

    @property
    def needs_teacher(self) -> bool:
        return any(p.needs_teacher and w > 0 for w, p in zip(self.weights, self.parts))

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        for p in self.parts:
            p.resolve(student_model, teacher_models)

    def feature_paths(self) -> tuple[list[str], list[str]]:
        """Union of the parts' (student paths, teacher paths), in first-seen order."""
        student, teacher = [], []
        for p in self.parts:
            s, t = p.feature_paths()
            student += [x for x in s if x not in student]
            teacher += [x for x in t if x not in teacher]
        return student, teacher

    def setup(self, student_shapes: dict, teacher_shapes: dict) -> None:
        for p in self.parts:
            p.setup(student_shapes, teacher_shapes)

    def formula(self) -> str:
        return "total = " + " + ".join(f"{w:g}*{p.describe()}" for w, p in zip(self.weights, self.parts))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> StepOutput:
        total = torch.zeros((), device=student.logits.device)
        parts = {}
        for w, p in zip(self.weights, self.parts):
            if teacher is None and p.needs_teacher and w == 0:
                continue  # needs_teacher told the engine it may skip the teacher for a zero-weight part
            value = p(student, teacher, batch)
            parts[p.name] = value.detach()
            total = total + w * value
        return StepOutput(loss=total, parts=parts)
