"""Model building: built-in nets, timm/torchvision adapters (against stand-in modules: the real libraries are an
optional 5.5 GiB extra), weights loading, and kdkit model folders."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models import build_model, load_model_folder, output_classes, save_model_folder


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("mlp", {"hidden": [16, 8]}, (1, 8, 8)),
        ("small_cnn", {"width": 4}, (3, 32, 32)),
        ("resnet", {"depth": 8, "width": 4}, (3, 32, 32)),
        ("mlp", {}, (13,)),
    ],
)
def test_builtin_models_give_one_logit_per_class(name, kwargs, shape):
    model = build_model("builtin", name, kwargs, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_resnet_depth_and_parameter_count():
    r20 = build_model("builtin", "resnet", {"depth": 20}, (3, 32, 32), 10)
    assert abs(sum(p.numel() for p in r20.parameters()) - 272_474) < 1_000  # He et al.: 0.27 M
    with pytest.raises(ConfigError, match=r"student\.model\.kwargs: depth=21; expected 6n \+ 2"):
        build_model("builtin", "resnet", {"depth": 21}, (3, 32, 32), 10, where="student.model")


def test_unknown_model_and_kwargs_are_named():
    with pytest.raises(ConfigError, match=r"student\.model\.name: unknown name 'mpl' \(did you mean: mlp"):
        build_model("builtin", "mpl", {}, (4,), 2, where="student.model")
    with pytest.raises(ConfigError, match=r"student\.model\.kwargs\.hiden: unknown parameter \(did you mean: hidden"):
        build_model("builtin", "mlp", {"hiden": [3]}, (4,), 2, where="student.model")
    with pytest.raises(ConfigError, match=r"num_classes: set by kdkit"):
        build_model("builtin", "mlp", {"num_classes": 3}, (4,), 2, where="student.model")


def test_image_model_on_table_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"small_cnn expects image inputs"):
        build_model("builtin", "small_cnn", {}, (13,), 2)


def test_folder_round_trip_and_checkpoint_loading(tmp_path):
    model = build_model("builtin", "mlp", {"hidden": [5]}, (4,), 3)
    spec = {"source": "builtin", "name": "mlp", "kwargs": {"hidden": [5]}, "in_shape": [4], "num_classes": 3}
    save_model_folder(model, tmp_path / "m", spec)
    again = load_model_folder(tmp_path / "m")
    x = torch.randn(3, 4)
    torch.testing.assert_close(again(x), model(x))
    from_ckpt = build_model(
        "builtin", "mlp", {"hidden": [5]}, (4,), 3, checkpoint=str(tmp_path / "m" / "model.safetensors")
    )
    torch.testing.assert_close(from_ckpt(x), model(x))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    from_pt = build_model("builtin", "mlp", {"hidden": [5]}, (4,), 3, checkpoint=str(tmp_path / "w.pt"))
    torch.testing.assert_close(from_pt(x), model(x))


def test_weights_that_do_not_fit_name_the_file_and_the_mismatch(tmp_path):
    model = build_model("builtin", "mlp", {"hidden": [5]}, (4,), 3)
    save_model_folder(model, tmp_path / "m", {})
    with pytest.raises(
        CompatibilityError, match=r"teacher\.checkpoint: model\.safetensors does not fit .*another shape"
    ):
        build_model(
            "builtin",
            "mlp",
            {"hidden": [6]},
            (4,),
            3,
            checkpoint=str(tmp_path / "m" / "model.safetensors"),
            where="teacher",
        )
    with pytest.raises(ConfigError, match=r"file .*nope\.pt' not found"):
        build_model("builtin", "mlp", {}, (4,), 3, checkpoint=str(tmp_path / "nope.pt"))
    (tmp_path / "pickle.pt").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="weights-only state dict"):
        build_model("builtin", "mlp", {}, (4,), 3, checkpoint=str(tmp_path / "pickle.pt"))
    with pytest.raises(ConfigError, match="not a kdkit model folder"):
        load_model_folder(tmp_path)


def test_output_classes_checks_shapes():
    model = build_model("builtin", "mlp", {}, (4,), 3)
    assert output_classes(model, torch.randn(2, 4), "student.model") == 3
    with pytest.raises(CompatibilityError, match=r"student\.model: the model cannot take inputs of shape \(5,\)"):
        output_classes(model, torch.randn(2, 5), "student.model")


def test_timm_adapter_passes_classes_and_channels(monkeypatch):
    calls = {}
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "resnet18"
    fake.list_models = lambda: ["resnet18", "resnet34"]

    def create_model(name, num_classes, in_chans, **kwargs):
        calls.update(name=name, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return nn.Linear(2, num_classes)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    build_model("timm", "resnet18", {"drop_rate": 0.1}, (1, 28, 28), 10)
    assert calls == {"name": "resnet18", "num_classes": 10, "in_chans": 1, "pretrained": False, "drop_rate": 0.1}
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet19' \(did you mean: resnet18"):
        build_model("timm", "resnet19", {}, (1, 28, 28), 10)


def test_torchvision_adapter(monkeypatch):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(
        list_models=lambda: ["resnet18"], get_model=lambda name, num_classes, **kw: nn.Linear(2, num_classes)
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    assert build_model("torchvision", "resnet18", {}, (3, 32, 32), 4).out_features == 4
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet81'"):
        build_model("torchvision", "resnet81", {}, (3, 32, 32), 4)


def test_missing_optional_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"pip install 'kdkit\[vision\]'"):
        build_model("timm", "resnet18", {}, (3, 32, 32), 4)
