"""Checks of a loaded config that need the registries (loss and model names, their parameters), without data
or training. Reports every problem at once."""

from __future__ import annotations

from kdkit.config import KDConfig
from kdkit.errors import ConfigError


def check_names(cfg: KDConfig) -> None:
    from kdkit.losses import LOSSES
    from kdkit.models import BUILTIN_MODELS
    from kdkit.registry import bind, lookup

    problems: list[str] = []

    def attempt(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except ConfigError as exc:
            problems.extend(exc.details or [str(exc)])

    for i, term in enumerate(cfg.distill.losses):
        where = f"distill.losses.{i}"
        try:
            cls = lookup(LOSSES, term.name, f"{where}.name")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        attempt(bind, cls.__init__, term.params, f"{where}.params")
    models = [(f"teacher.members.{i}.model", m.model) for i, m in enumerate(cfg.teacher.members)]
    models.append(("student.model", cfg.student.model))
    for where, spec in models:
        if spec.source != "builtin":
            continue
        try:
            cls = lookup(BUILTIN_MODELS, spec.name, f"{where}.name")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        attempt(bind, cls.__init__, spec.kwargs, f"{where}.kwargs", provided=("in_shape", "num_classes"))
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems", details=problems)
