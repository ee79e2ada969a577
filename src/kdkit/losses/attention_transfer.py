"""Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps of paired layers."""

from __future__ import annotations

import torch

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, ParamError, non_negative, positive
from kdkit.models.taps import get_feature
from kdkit.types import Batch, ModelOutputs


class AttentionTransfer(Loss):
    """(β/2) · Σ_pairs mean (a(s) − a(t))², the authors' code convention (see functional.attention_transfer).

    pairs: [[student module path, teacher module path], ...] of (C, H, W) feature maps; channels may differ and
    a student map of another spatial size is resized to the teacher's. No adapters, so nothing is trained here.
    """

    name = "attention_transfer"
    reads_logits = False

    def __init__(self, pairs: list[list[str]], p: float = 2.0, beta: float = 1000.0):
        super().__init__()
        ok = isinstance(pairs, (list, tuple)) and len(pairs) > 0
        ok = ok and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)
            for pair in pairs
        )
        if not ok:
            raise ParamError("pairs", pairs, "a non-empty list of [student path, teacher path]")
        self.pairs = [(str(s), str(t)) for s, t in pairs]
        self.p = positive("p", p)
        self.beta = non_negative("beta", beta)

    def feature_paths(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self.pairs], [t for _, t in self.pairs]

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        for side, shapes, paths in zip(("student", "teacher"), (student_shapes, teacher_shapes), self.feature_paths()):
            for path in paths:
                if len(shapes[path]) != 3:
                    raise CompatibilityError(
                        f"attention_transfer: {side} feature {path!r} has shape {tuple(shapes[path])}; "
                        "expected a (C, H, W) feature map"
                    )

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        s = [get_feature(student.features, p, "attention_transfer (student)") for p, _ in self.pairs]
        t = [get_feature(teacher.features, p, "attention_transfer (teacher)") for _, p in self.pairs]
        return Fk.attention_transfer(s, t, self.p, self.beta)

    def describe(self) -> str:
        return f"attention_transfer(p={self.p:g}, beta={self.beta:g}, {len(self.pairs)} pairs)"
