"""What every loss looks like to the engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn


class ParamError(ValueError):
    """A loss parameter outside what the loss accepts. `param` names it, so that a config error can name the field
    (distill.losses.1.params.temperature); str() is "temperature=0; expected a number > 0"."""

    def __init__(self, param: str, value: Any, expected: str):
        self.param, self.value, self.expected = param, value, expected
        super().__init__(f"{param}={value!r}; expected {expected}")


def number(param: str, value: Any, ok: Callable[[float], bool], expected: str) -> float:
    """`value` as a float when it is a finite real number (not a bool) with ok(value); else ParamError.

    NaN and ±inf fail (a NaN passes `value <= 0` checks unnoticed and poisons the loss at its first step).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ParamError(param, value, expected)
    return float(value)


def positive(param: str, value: Any) -> float:
    return number(param, value, lambda v: v > 0, "a number > 0")


def non_negative(param: str, value: Any) -> float:
    return number(param, value, lambda v: v >= 0, "a number >= 0")


def choice(param: str, value: Any, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ParamError(param, value, "one of " + ", ".join(choices))
    return value


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

    `needs_labels` is True for a loss that reads batch.labels as the true class of every example (dkd, mutual):
    such a loss cannot train on unlabelled examples (label -100, a transfer set). ce skips them, so it is False.
    Constructors check their parameters and raise ParamError (a ValueError naming the parameter) for a bad value;
    `kdkit validate` builds every loss once for each value a schedule can give it, so those checks cover schedules.
    """

    needs_teacher: bool = True
    needs_labels: bool = False
    reads_logits: bool = True  # False for a loss that reads tapped features only (it can run beside a fused head)
    # True for a loss that reads the logits at a few positions only and takes a causal LM's hidden state and head
    # instead (kdkit.losses.at_positions): it too runs beside a fused head, and never makes the whole logits.
    reads_positions: bool = False
    name = "loss"

    def describe(self) -> str:
        return self.name

    def set_epoch(self, epoch: float) -> None:
        """Called by the engine before every micro-batch with the fractional epoch (0.0 at the start, 1.5 half-way
        through the second epoch). Default: nothing to remember. A loss that changes over training (a warm-up)
        keeps it and reads it in forward()."""

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        """Turn layer indices into module paths, given the real models. Default: nothing to resolve."""

    def feature_paths(self) -> tuple[list[str], list[str]]:
        """(student module paths, teacher module paths) this loss reads from ModelOutputs.features."""
        return [], []

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Build adapters from feature shapes (without the batch dimension). Default: nothing to build."""
