"""The total loss: an explicit weighted sum of named parts."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs, StepOutput


def log_names(names: list[str]) -> list[str]:
    """How each term is logged: its loss name, or name.<position> when the name occurs more than once.

    ["ce", "hint", "hint"] → ["ce", "hint.1", "hint.2"]: the suffix is the term's position in the list (its index
    in distill.losses), so the label says which config entry a logged value belongs to.
    """
    return [f"{n}.{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class WeightedLoss(nn.Module):
    """total = Σ weight_i · loss_i. Weights are explicit: there is no hidden (1 − α) complement.

    forward() returns every part before weighting in StepOutput.parts under `part_names[i]` (see log_names).
    """

    def __init__(self, terms: list[tuple[float, Loss]]):
        super().__init__()
        if not terms:
            raise ValueError("a WeightedLoss needs at least one term")
        self.weights = [float(w) for w, _ in terms]
        self.parts = nn.ModuleList([loss for _, loss in terms])
        self.part_names = log_names([loss.name for _, loss in terms])

    @property
    def needs_teacher(self) -> bool:
        return any(p.needs_teacher and w > 0 for w, p in zip(self.weights, self.parts))

    @property
    def needs_labels(self) -> bool:
        """Some part reads the true label of every example (Loss.needs_labels)."""
        return any(p.needs_labels for p in self.parts)

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

    def set_epoch(self, epoch: float) -> None:
        """Tell every part the fractional epoch (the engine calls this before every micro-batch)."""
        for p in self.parts:
            p.set_epoch(epoch)

    def formula(self) -> str:
        """E.g. "total = 0.1*ce + 0.9*soft_kl(T=4)"; a repeated loss shows its log label: "0.5*hint(...) [hint.1]"."""
        terms = []
        for w, p, label in zip(self.weights, self.parts, self.part_names):
            terms.append(f"{w:g}*{p.describe()}" + (f" [{label}]" if label != p.name else ""))
        return "total = " + " + ".join(terms)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> StepOutput:
        total = torch.zeros((), device=student.logits.device)
        parts = {}
        for w, p, label in zip(self.weights, self.parts, self.part_names):
            if teacher is None and p.needs_teacher and w == 0:
                continue  # needs_teacher told the engine it may skip the teacher for a zero-weight part
            value = p(student, teacher, batch)
            parts[label] = value.detach()
            total = total + w * value
        return StepOutput(loss=total, parts=parts)
