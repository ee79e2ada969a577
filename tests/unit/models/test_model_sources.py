"""The model-source registry names exactly the values `model.source` accepts; what each source implies (a folder
with its own spec and trained weights, names checked without building) comes from its entry."""

from __future__ import annotations

import typing

import pytest
import torch

from kdkit.config import ModelSpec
from kdkit.errors import ConfigError
from kdkit.models import MODEL_SOURCES, build_model, check_model, comes_trained, model_spec, save_model_folder


def test_model_sources_are_exactly_the_config_values():
    values = typing.get_args(ModelSpec.model_fields["source"].annotation)
    assert len(values) == 6
    assert sorted(MODEL_SOURCES) == sorted(values)


def test_build_model_dispatches_through_the_registry(monkeypatch):
    calls = []
    entry = MODEL_SOURCES["timm"]
    monkeypatch.setitem(
        MODEL_SOURCES,
        "timm",
        type(entry)(lambda *args: calls.append(args) or torch.nn.Linear(2, args[4])),
    )
    model = build_model("timm", "net", {"a": 1}, (2,), 3, path="p", where="student.model", pretrained=False)
    assert model.out_features == 3
    assert calls == [("net", "p", {"a": 1}, (2,), 3, False, "student.model")]


def test_unknown_source_is_named():
    with pytest.raises(ConfigError, match=r"student.model.source: unknown name 'timn' \(did you mean: timm"):
        build_model("timn", "x", {}, (2,), 3, where="student.model")


def test_a_kdkit_folder_brings_its_own_spec_and_weights(tmp_path):
    model = build_model("builtin", "mlp", {"hidden": [5]}, (4,), 3)
    spec = model_spec("builtin", "mlp", {"hidden": [5]}, (4,), 3)
    assert spec == {"source": "builtin", "name": "mlp", "kwargs": {"hidden": [5]}, "in_shape": [4], "num_classes": 3}
    save_model_folder(model, tmp_path / "m", spec)
    assert model_spec("kdkit", None, {}, (9,), 7, str(tmp_path / "m")) == spec  # the folder's, not the arguments'
    assert comes_trained("kdkit", None) and comes_trained("builtin", "w.safetensors")
    assert not comes_trained("builtin", None) and not comes_trained("hf", None)


def test_check_model_checks_builtin_names_and_kwargs_without_building():
    check_model("builtin", "mlp", {"hidden": [3]}, "student.model")
    check_model("timm", "anything", {"x": 1}, "student.model")  # checked when built (the library may be absent)
    with pytest.raises(ConfigError, match=r"student.model.name: unknown name 'mpl' \(did you mean: mlp"):
        check_model("builtin", "mpl", {}, "student.model")
    with pytest.raises(ConfigError, match=r"student.model.kwargs.hiden: unknown parameter"):
        check_model("builtin", "mlp", {"hiden": [3]}, "student.model")
