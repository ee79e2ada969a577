"""Tasks: what differs between distilling a classifier, a language model and an interpretable tabular model.

TASKS is the registry (a literal dict); kdkit.tasks.base.Task is the protocol each entry implements. A config names
its task in `data.task` (default classification); a config with `kind: interpret` is a tabular one.
"""

from __future__ import annotations

from kdkit.registry import lookup
from kdkit.tasks.base import Task
from kdkit.tasks.causal_lm import CausalLM
from kdkit.tasks.classification import Classification
from kdkit.tasks.tabular import Tabular

TASKS: dict[str, Task] = {
    "classification": Classification(),
    "causal_lm": CausalLM(),
    "tabular": Tabular(),
}


def task_of(raw: dict) -> Task:
    """The task a raw config mapping names (before validation; unknown names fail with "did you mean")."""
    data = raw.get("data") if isinstance(raw, dict) else None
    name = data.get("task") if isinstance(data, dict) else None
    if name is None:
        name = "tabular" if isinstance(raw, dict) and raw.get("kind") == "interpret" else "classification"
    return lookup(TASKS, str(name), "data.task")


def load_task(config, overrides: tuple[str, ...] = ()) -> tuple[Task, object]:
    """The task a config (a YAML path or a mapping) names, and the config validated by that task with `--set`
    overrides."""
    from pathlib import Path

    from kdkit.config import read_yaml

    raw = dict(config) if not isinstance(config, (str, Path)) else read_yaml(config)
    task = task_of(raw)
    return task, task.load_config(config, tuple(overrides))


__all__ = ["TASKS", "Task", "load_task", "task_of"]
