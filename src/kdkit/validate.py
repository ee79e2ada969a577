"""Checks of a loaded config that need the registries (loss, model and data set names, the losses' parameters and
their valid ranges), without data or training; and the config reference, which lists what the registries hold.
Reports every problem at once."""

from __future__ import annotations

from kdkit.config import KDConfig, LossTerm, config_markdown
from kdkit.errors import ConfigError


def check_names(cfg: KDConfig, datasets: dict | None = None) -> None:
    """Every problem in one ConfigError, one line each, naming its field:

    - loss names (did you mean), their parameters (bound against the constructor), and their values: each loss is
      built once with its start values and once more for each extreme value a scheduled parameter reaches
      (ScheduleSpec.reachable over train.epochs), so `temperature: -1` or a temperature schedule to 0 fails here,
      not with a NaN at the run's last step;
    - each model section through its source's registry entry (built-in names and kwargs), and its init_from
      weights (the file exists, or the builtin:<name> is known and its package installed);
    - built-in data set names (data.source: builtin) against `datasets`, the task's registry of them (default:
      the class-labelled sets of kdkit.data.builtin).
    """
    from kdkit.models.build import check_init_from, check_model
    from kdkit.registry import lookup

    problems: list[str] = []

    def attempt(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            problems.extend(exc.details or [str(exc)])
            return None

    for i, term in enumerate(cfg.distill.losses):
        attempt(_check_loss, term, f"distill.losses.{i}", cfg.train.epochs)
    models = [(f"teacher.members.{i}.model", m.model) for i, m in enumerate(cfg.teacher.members)]
    models.append(("student.model", cfg.student.model))
    for where, spec in models:
        attempt(check_model, spec.source, spec.name, spec.kwargs, where)
        attempt(check_init_from, spec.init_from, f"{where}.init_from")
    if cfg.data.source == "builtin":  # other sources name files or hub data sets, which only loading can check
        if datasets is None:
            from kdkit.data.builtin import BUILTIN_DATASETS as datasets
        attempt(lookup, datasets, cfg.data.name, "data.name")
    if problems:
        if len(problems) == 1:
            raise ConfigError(problems[0])
        raise ConfigError(f"{len(problems)} problems", details=problems)


def _check_loss(term: LossTerm, where: str, epochs: int) -> None:
    """Build the loss at its start values, then with each scheduled parameter at each extreme it reaches (the other
    parameters at their start values); one problem per parameter."""
    from kdkit import losses
    from kdkit.registry import bind, lookup

    cls = lookup(losses.LOSSES, term.name, f"{where}.name")
    _, params = term.start_values()
    kwargs = bind(cls.__init__, params, f"{where}.params")
    scheduled = {k: spec for k, spec in term.schedules().items() if k != "weight"}  # the config checks weights

    def at_start(param: str) -> str:
        return f"at the start of its {scheduled[param].schedule} schedule" if param in scheduled else ""

    losses.construct(cls, kwargs, f"{where}.params", at_start)
    problems = []
    for param, spec in scheduled.items():
        for value, when in spec.reachable(epochs):
            try:
                losses.construct(
                    cls,
                    {**kwargs, param: value},
                    f"{where}.params",
                    lambda failed, param=param, value=value, when=when: (
                        f"at {when}" if failed == param else f"with {param}={value:g} (at {when})"
                    ),
                )
            except ConfigError as exc:
                problems.append(str(exc))
                break
    if problems:  # one line each; the caller lists exc.details (or the message when there are none)
        raise ConfigError(problems[0], details=problems if len(problems) > 1 else None)


def config_docs() -> str:
    """docs/config.md: the reference of every config field (kdkit.config.config_markdown) with the names the
    registries accept filled in from the registries themselves, so a new loss shows up without editing the docs."""
    from kdkit import losses

    return config_markdown({"LossTerm.name": list(losses.LOSSES)})
