"""The distillation loss of a config's `distill.losses`, with its schedules: the same for every torch task."""

from __future__ import annotations

from kdkit.engine.schedules import Schedule, ScheduledValue
from kdkit.losses import WeightedLoss, build_loss


def loss_terms(losses) -> list[tuple[str, float, dict]]:
    """[(name, starting weight, starting params)] of the configured terms."""
    return [(t.name, *t.start_values()) for t in losses]


def loss_schedules(losses) -> list[ScheduledValue]:
    """Every scheduled weight or parameter of the configured terms."""
    return [
        ScheduledValue(
            i, what, Schedule(spec.schedule, spec.start, spec.end, spec.unit, spec.warmup_steps, spec.every, spec.gamma)
        )
        for i, t in enumerate(losses)
        for what, spec in t.schedules().items()
    ]


def needs_teacher(loss: WeightedLoss, schedules: list[ScheduledValue]) -> bool:
    """A loss whose weight starts at 0 but is scheduled to grow needs the teacher too."""
    return loss.needs_teacher or any(loss.parts[sv.term].needs_teacher for sv in schedules)


def baseline_loss(name: str, losses) -> WeightedLoss:
    """The baseline's loss: the task's label loss alone, with the params the config gives that loss."""
    return build_loss([(name, 1.0, next((t.params for t in losses if t.name == name), {}))])
