"""Values that change over training: loss weights, loss parameters (the KD temperature), and how they are applied.

A schedule maps training progress to a value:
    constant   start
    linear     start → end
    cosine     start → end along a half cosine (fast change in the middle, flat at both ends)
    step       start · gamma^(epoch // every)      (end unused)
with an optional linear warm-up from 0 over the first `warmup_steps` optimizer steps, and `unit: epoch` to change
the value once per epoch instead of every step. The LR keeps its own schedule (train.schedule, engine/optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    start: float = 0.0
    end: float | None = None
    unit: str = "step"
    warmup_steps: int = 0
    every: int = 1
    gamma: float = 0.1

    def value(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """The value at optimizer step `step` (0-based) of `total_steps`."""
        end = self.start if self.end is None else self.end
        if self.unit == "epoch":
            epochs = max(1, math.ceil(total_steps / max(1, steps_per_epoch)))
            progress = min(1.0, (step // max(1, steps_per_epoch)) / max(1, epochs - 1))
        else:
            progress = min(1.0, step / max(1, total_steps - 1))
        if self.kind == "constant":
            v = self.start
        elif self.kind == "linear":
            v = self.start + (end - self.start) * progress
        elif self.kind == "cosine":
            v = end + (self.start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "step":
            epoch = step // max(1, steps_per_epoch)
            v = self.start * self.gamma ** (epoch // max(1, self.every))
        else:
            raise ValueError(f"schedule kind {self.kind!r}; expected constant, linear, cosine or step")
        if self.warmup_steps and step < self.warmup_steps:
            v *= (step + 1) / self.warmup_steps
        return v

    def describe(self) -> str:
        end = "" if self.kind in ("constant", "step") or self.end is None else f"→{self.end:g}"
        extra = f", ×{self.gamma:g}/{self.every} ep" if self.kind == "step" else ""
        warm = f", warm-up {self.warmup_steps}" if self.warmup_steps else ""
        return f"{self.kind} {self.start:g}{end}{extra}{warm}"


@dataclass(frozen=True)
class ScheduledValue:
    """A schedule bound to a loss term: `what` is "weight" or the name of a loss parameter (e.g. temperature)."""

    term: int
    what: str
    schedule: Schedule


def apply_schedules(
    loss, scheduled: list[ScheduledValue], step: int, total_steps: int, steps_per_epoch: int
) -> dict[str, float]:
    """Set the scheduled weights and parameters on a WeightedLoss for this step; return them for logging."""
    now = {}
    for sv in scheduled:
        v = sv.schedule.value(step, total_steps, steps_per_epoch)
        part = loss.parts[sv.term]
        if sv.what == "weight":
            loss.weights[sv.term] = v
        else:
            setattr(part, sv.what, v)
        now[f"sched/{loss.part_names[sv.term]}.{sv.what}"] = v  # a loss named twice is logged twice
    return now
