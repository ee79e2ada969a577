"""FitNets hint loss (Romero et al. 2015): MSE between an adapted student layer and a teacher layer."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, ParamError
from kdkit.models.adapters import make_adapter
from kdkit.models.taps import get_feature
from kdkit.types import Batch, ModelOutputs


class Hint(Loss):
    """feature_mse(adapter(student[student_layer]), teacher[teacher_layer]).

    The adapter (Identity, 1×1 conv + BN, or Linear; see kdkit.models.adapters) is built in setup() from the tapped
    shapes and trained with the student. For (B, T, D) features the batch's attention_mask excludes padding.
    """

    name = "hint"
    reads_logits = False

    def __init__(self, student_layer: str, teacher_layer: str):
        super().__init__()
        for field, value in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            if not isinstance(value, str) or not value:
                raise ParamError(field, value, "a module path such as 'layer2'")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.adapter: nn.Module | None = None

    def feature_paths(self) -> tuple[list[str], list[str]]:
        return [self.student_layer], [self.teacher_layer]

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        where = f"hint {self.student_layer}→{self.teacher_layer}"
        self.adapter = make_adapter(student_shapes[self.student_layer], teacher_shapes[self.teacher_layer], where)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        if self.adapter is None:
            raise RuntimeError("hint: setup() builds the adapter from the feature shapes; call it before forward")
        s = self.adapter(get_feature(student.features, self.student_layer, "hint (student)"))
        t = get_feature(teacher.features, self.teacher_layer, "hint (teacher)")
        mask = batch.attention_mask if s.dim() == 3 else None
        return Fk.feature_mse(s, t, mask)

    def describe(self) -> str:
        return f"hint({self.student_layer}→{self.teacher_layer})"
