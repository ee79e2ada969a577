"""The shipped configs for the seeds' vision pairs run end to end on real torchvision networks, shortened (few
examples, one epoch): configs/vision_resnet50_to_resnet18.yaml and configs/vision_vgg16bn_to_small_cnn.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdkit.config import load_config
from kdkit.export import export_run
from kdkit.pipeline import distill

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHORT = {
    "run": {"seeds": [0], "progress": False, "tensorboard": False},
    "data": {"limit": 100},
    "teacher": {"train": {"epochs": 1, "batch_size": 16}},
    "train": {"epochs": 1, "batch_size": 16},
    "eval": {"latency_repeats": 1, "latency_warmup": 0, "robustness": False},
}


def shortened(name: str) -> dict:
    import yaml

    raw = yaml.safe_load((CONFIGS / name).read_text())
    for section, values in SHORT.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw.setdefault(section, {}).setdefault(key, {}).update(value)
            else:
                raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize(
    ("config", "feature_term", "folds"),
    [("vision_resnet50_to_resnet18.yaml", "attention_transfer", 53), ("vision_vgg16bn_to_small_cnn.yaml", "hint", 13)],
)
def test_a_shipped_vision_config_runs_end_to_end(tmp_path, config, feature_term, folds):
    lines: list[str] = []
    out = tmp_path / "run"
    distill(load_config(shortened(config)), out=out, log=lines.append)
    assert f"teacher: folded {folds} BatchNorm layers into the layers before them (outputs checked)" in lines
    history = json.loads((out / "history.json").read_text())["student-s0"]
    values = [row[f"train/{feature_term}"] for row in history if f"train/{feature_term}" in row]
    assert values and all(np.isfinite(values)) and min(values) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "student" in json.dumps(metrics)
    result = export_run(out, "onnx", tmp_path / "onnx")
    assert result.max_abs_diff < 1e-3 and result.label_agreement == 1.0
