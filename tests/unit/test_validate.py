"""kdkit.validate: the checks of `kdkit validate` that need the registries, and the config reference built from them.

Issue #13: the losses' own range checks run at validation (bug 5), for every value a schedule reaches; built-in data
set names are checked (bug 11); a new loss needs its file, one LOSSES line and its test, nothing else.
"""

from __future__ import annotations

import pytest
import torch

import kdkit.losses
from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.losses import LOSSES, Loss, build_loss
from kdkit.losses.base import positive
from kdkit.types import ModelOutputs
from kdkit.validate import check_names, config_docs

BASE = {
    "data": {"source": "builtin", "name": "digits"},
    "teacher": {"members": [{"model": {"name": "mlp"}}]},
    "student": {"model": {"name": "mlp"}},
    "train": {"epochs": 10},
}


def _with_losses(*losses: dict) -> dict:
    return {**BASE, "distill": {"losses": [{"name": "ce", "weight": 0.1}, *losses]}}


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_names(load_config(raw))
    return info.value.details or [str(info.value)]


def test_the_loss_constructor_checks_run_at_validation():
    # Loaded fine (params are free-form in the config); the loss itself rejects T = -1.
    raw = _with_losses({"name": "soft_kl", "params": {"temperature": -1}})
    assert _problems(raw) == ["distill.losses.1.params.temperature: temperature=-1; expected a number > 0"]


def test_a_temperature_annealed_to_zero_fails_at_validation_not_at_the_last_step():
    anneal = {"schedule": "linear", "start": 4, "end": 0}
    raw = _with_losses({"name": "soft_kl", "params": {"temperature": anneal}})
    assert _problems(raw) == [
        "distill.losses.1.params.temperature: at the end of its linear schedule, temperature=0.0; expected a number > 0"
    ]
    check_names(load_config(_with_losses({"name": "soft_kl", "params": {"temperature": {**anneal, "end": 1}}})))


def test_every_extreme_of_a_schedule_is_checked():
    # label_smoothing must stay below 1: a cosine schedule up to 1 fails at its end.
    raw = _with_losses()
    raw["distill"]["losses"][0]["params"] = {"label_smoothing": {"schedule": "cosine", "start": 0, "end": 1}}
    assert _problems(raw)[0].startswith("distill.losses.0.params.label_smoothing: at the end of its cosine schedule")
    # Every term and every scheduled parameter is checked, one problem per field; a step decay stays > 0.
    raw = _with_losses(
        {
            "name": "dkd",
            "params": {
                "temperature": {"schedule": "linear", "start": 4, "end": 0},
                "alpha": {"schedule": "step", "start": 1, "gamma": 0.5, "every": 3},
            },
        },
        {"name": "soft_kl", "params": {"temperature": {"schedule": "constant", "start": 0}}},
    )
    problems = _problems(raw)
    assert problems == [
        "distill.losses.1.params.temperature: at the end of its linear schedule, temperature=0.0; expected a "
        "number > 0",
        "distill.losses.2.params.temperature: at the start of its constant schedule, temperature=0; expected a "
        "number > 0",
    ]


def test_schedules_that_stay_in_range_pass():
    raw = _with_losses(
        {
            "name": "soft_kl",
            "weight": {"schedule": "linear", "start": 0, "end": 0.9},
            "params": {"temperature": {"schedule": "step", "start": 8, "gamma": 0.5, "every": 2, "warmup_steps": 10}},
        }
    )
    cfg = load_config(raw)
    check_names(cfg)  # raises on any value out of range
    reached = [v for v, _ in cfg.distill.losses[-1].schedules()["temperature"].reachable(cfg.train.epochs)]
    assert min(reached) > 0 and 8 in reached  # the values it checked: all in range


def test_unknown_builtin_data_set_names_the_field_with_a_suggestion():
    raw = {**BASE, "data": {"source": "builtin", "name": "digit"}}
    (problem,) = _problems(raw)
    assert problem.startswith("data.name: unknown name 'digit' (did you mean: digits")
    (problem,) = _problems({**BASE, "data": {"source": "builtin", "name": "cifar1000"}})
    assert problem.startswith("data.name: unknown name 'cifar1000'") and "digits" in problem
    check_names(load_config({**BASE, "data": {"source": "builtin", "name": "mnist5k"}}))


def test_causal_lm_builtin_names_are_the_corpora():
    from kdkit.data.lm import CORPORA

    raw = {
        "data": {"task": "causal_lm", "source": "builtin", "name": "shakespeare"},
        "teacher": {"members": [{"model": {"source": "hf", "path": "x"}}]},
        "student": {"model": {"source": "hf", "path": "y"}},
        "distill": {"losses": [{"name": "token_kl"}]},
    }
    from kdkit.tasks import load_task

    task, cfg = load_task(raw)
    task.check(cfg)  # the causal_lm task checks built-in names against the corpora
    raw["data"]["name"] = "digits"
    task, cfg = load_task(raw)
    with pytest.raises(ConfigError) as err:
        task.check(cfg)
    problem = str(err.value)
    assert problem.startswith("data.name: unknown name 'digits'") and all(n in problem for n in CORPORA)


def test_the_config_reference_lists_every_registered_loss():
    docs = config_docs()
    line = next(x for x in docs.splitlines() if x.startswith("| `name` | str | required | A loss name"))
    assert line.endswith("One of: " + ", ".join(f"`{n}`" for n in LOSSES) + ". |")


class Scaled(Loss):
    """A throwaway logit loss: scale · mean squared logit."""

    name = "scaled"
    needs_teacher = False

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = positive("scale", scale)

    def forward(self, student, teacher, batch):
        return self.scale * student.logits.pow(2).mean()


def test_adding_a_loss_is_its_class_and_one_registry_line(monkeypatch):
    # No other list to edit: build_loss, kdkit validate and the config reference all read LOSSES.
    monkeypatch.setattr(kdkit.losses, "LOSSES", {**LOSSES, "scaled": Scaled})
    loss = build_loss([("scaled", 1.0, {"scale": 2.0})])
    assert loss.formula() == "total = 1*scaled"
    check_names(load_config(_with_losses({"name": "scaled", "params": {"scale": 2.0}})))
    assert _problems(_with_losses({"name": "scaled", "params": {"scale": 0}})) == [
        "distill.losses.1.params.scale: scale=0; expected a number > 0"
    ]
    assert "`scaled`" in config_docs()
    assert loss(ModelOutputs(torch.ones(2, 3)), None, None).loss.item() == 2.0
