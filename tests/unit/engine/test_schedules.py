"""Schedules: values at chosen steps, and the loop applies them to loss weights and the KD temperature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdkit.config import load_config
from kdkit.data import TensorData
from kdkit.engine import TrainOptions, train
from kdkit.engine.schedules import Schedule, ScheduledValue
from kdkit.errors import ConfigError
from kdkit.losses import build_loss
from kdkit.teachers import Teacher


@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        (Schedule("constant", 3.0), 50, 3.0),
        (Schedule("linear", 0.0, 0.9), 0, 0.0),
        (Schedule("linear", 0.0, 0.9), 50, 0.45),
        (Schedule("linear", 0.0, 0.9), 100, 0.9),
        (Schedule("cosine", 8.0, 2.0), 0, 8.0),
        (Schedule("cosine", 8.0, 2.0), 50, 5.0),
        (Schedule("cosine", 8.0, 2.0), 25, 2.0 + 6.0 * 0.5 * (1 + math.cos(math.pi * 0.25))),
        (Schedule("cosine", 8.0, 2.0), 100, 2.0),
        (Schedule("step", 1.0, every=2, gamma=0.5), 19, 1.0),  # 10 steps/epoch: epoch 1
        (Schedule("step", 1.0, every=2, gamma=0.5), 20, 0.5),  # epoch 2
        (Schedule("step", 1.0, every=2, gamma=0.5), 45, 0.25),  # epoch 4
        (Schedule("constant", 1.0, warmup_steps=10), 4, 0.5),
        (Schedule("linear", 0.0, 1.0, unit="epoch"), 15, 0.1),  # epoch 1 of 11 epochs (101 steps / 10)
    ],
)
def test_schedule_values(schedule, step, expected):
    assert schedule.value(step, total_steps=101, steps_per_epoch=10) == pytest.approx(expected)


def test_loop_applies_weight_and_temperature_schedules():
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g))
    torch.manual_seed(0)
    teacher = Teacher(nn.Linear(4, 3))
    student = nn.Linear(4, 3)
    loss = build_loss([("ce", 1.0, {}), ("soft_kl", 0.0, {"temperature": 8.0})])
    scheds = [
        ScheduledValue(1, "weight", Schedule("linear", 0.0, 1.0)),
        ScheduledValue(1, "temperature", Schedule("linear", 8.0, 2.0)),
    ]
    r = train(
        student,
        loss,
        data,
        TrainOptions(epochs=2, batch_size=4, keep_best="none"),
        teacher=lambda b: teacher(b.inputs),
        device="cpu",
        progress=False,
        schedules=scheds,
    )
    records = [h for h in r.history if "sched/soft_kl.temperature" in h]
    temps = [h["sched/soft_kl.temperature"] for h in records]
    assert temps[0] > temps[-1] and temps[-1] == pytest.approx(2.0)
    assert records[-1]["sched/soft_kl.weight"] == pytest.approx(1.0)
    assert loss.parts[1].temperature == pytest.approx(2.0) and loss.weights[1] == pytest.approx(1.0)
    assert records[-1]["train/soft_kl"] > 0  # the teacher was used although the weight started at 0


BASE = {"teacher": {"members": [{"model": {"name": "mlp"}}]}, "student": {"model": {"name": "mlp"}}}


def test_schedules_in_the_config_and_their_errors():
    cfg = load_config(
        {
            **BASE,
            "distill": {
                "losses": [
                    {
                        "name": "soft_kl",
                        "weight": {"schedule": "linear", "start": 0, "end": 0.9},
                        "params": {"temperature": {"schedule": "cosine", "start": 8, "end": 2}},
                    }
                ]
            },
        }
    )
    term = cfg.distill.losses[0]
    assert term.start_values() == (0.0, {"temperature": 8})
    assert set(term.schedules()) == {"weight", "temperature"}
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.weight: start: Input should be greater than or equal"):
        load_config(
            {
                **BASE,
                "distill": {"losses": [{"name": "soft_kl", "weight": {"schedule": "linear", "start": -1, "end": 1}}]},
            }
        )
    with pytest.raises(ConfigError, match=r"temperature: a cosine schedule needs `end`"):
        load_config(
            {
                **BASE,
                "distill": {
                    "losses": [{"name": "soft_kl", "params": {"temperature": {"schedule": "cosine", "start": 8}}}]
                },
            }
        )
