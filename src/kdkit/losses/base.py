"""What every loss looks like to the engine."""

from __future__ import annotations

import torch
from torch import nn


class Loss(nn.Module):
    """A loss is a thin module around a function of `kdkit.losses.functional`.

    Each loss defines forward(student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> scalar
    tensor. `needs_teacher` tells the engine whether to run (or read) the
    teacher for it; `describe()` is how it appears in the printed formula, e.g. "soft_kl(T=4)".
    A loss never runs a model.

    Feature losses also say which activations they need and get to see the models and shapes once, when the run
    is built (before the optimizer exists, so that adapters they create are trained with the student):
      resolve(student_model, teacher_models)   turn layer indices or "uniform" maps into module paths (optional)
      feature_paths() -> (student_paths, teacher_paths)   module paths to tap with forward hooks
      setup(student_shapes, teacher_shapes)     build adapters from the tapped shapes (per path, without batch)
    Tapped activations arrive in ModelOutputs.features, keyed by module path.
    """

    needs_teacher: bool = True
    name = "loss"

    def describe(self) -> str:
        return self.name

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        """Turn layer indices into module paths, given the real models. Default: nothing to resolve."""

    def feature_paths(self) -> tuple[list[str], list[str]]:
        """(student module paths, teacher module paths) this loss reads from ModelOutputs.features."""
        return [], []

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Build adapters from feature shapes (without the batch dimension). Default: nothing to build."""
