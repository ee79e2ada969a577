"""What every loss looks like to the engine."""

from __future__ import annotations

from torch import nn

from kdkit.types import Batch, ModelOutputs


class Loss(nn.Module):
    """A loss is a thin module around a function of `kdkit.losses.functional`.

    forward(student, teacher, batch) -> scalar tensor. `needs_teacher` tells the engine whether to run (or read) the
    teacher for it; `describe()` is how it appears in the printed formula, e.g. "soft_kl(T=4)".
    A loss never runs a model.
    """

    needs_teacher: bool = True

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    name = "loss"
