"""Adapters map a student feature to the teacher's feature shape, so that a feature loss can compare them.

They are ordinary modules owned by the loss module (FitNets' "regressor"): their parameters are in
`loss.parameters()`, trained with the student, checkpointed with `loss_modules`, and never part of the exported
student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import CompatibilityError


class Resize(nn.Module):
    """Bilinear resize of (B, C, H, W) maps to a fixed (H', W') (align_corners=False)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], where: str) -> nn.Module:
    """A module taking student features of `student_shape` to `teacher_shape` (shapes without the batch dim).

    equal shapes           → Identity
    (C, H, W) → (C', H', W') → 1×1 conv (no bias) + BatchNorm2d, then a bilinear resize when (H, W) ≠ (H', W')
    (D,) → (D',)            → Linear(D, D')
    (T, D) → (T, D')        → Linear(D, D') per position (T must match)
    Anything else is a CompatibilityError naming `where` and both shapes.
    """
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if s == t:
        return nn.Identity()
    if len(s) == 3 and len(t) == 3:
        layers = [nn.Conv2d(s[0], t[0], kernel_size=1, bias=False), nn.BatchNorm2d(t[0])]
        if s[1:] != t[1:]:
            layers.append(Resize(t[1:]))
        return nn.Sequential(*layers)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 2 and len(t) == 2 and s[0] == t[0]:
        return nn.Linear(s[1], t[1])
    raise CompatibilityError(
        f"{where}: cannot map student features of shape {s} to teacher features of shape {t}; adapters map "
        "(C, H, W)→(C', H', W'), (D,)→(D',) and (T, D)→(T, D') with the same T: tap layers whose outputs fit"
    )
