"""build_model: one network from its source (built-in, timm, torchvision, a kdkit student folder, transformers),
with weights. The sources are a literal registry, MODEL_SOURCES, whose keys are the values of `model.source`.

A student folder is what kdkit writes for every trained network: `model.safetensors` and `model.json` (source,
name, kwargs, input shape, class count), which is all it takes to rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.atomic import write_json, write_with
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models.small import BUILTIN_MODELS
from kdkit.registry import bind, lookup

# ---------------------------------------------------------------------------------------------------------------
# One builder per source. Every builder has the signature of `Builder`:
#     (name, path, kwargs, in_shape, num_classes, pretrained, where) -> nn.Module
# `where` is the config field of the model (e.g. "student.model") for error messages.


def build_builtin(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """One of kdkit's small nets (BUILTIN_MODELS), its kwargs checked against the constructor."""
    cls = lookup(BUILTIN_MODELS, name, f"{where}.name")
    params = bind(cls.__init__, kwargs, f"{where}.kwargs", provided=("in_shape", "num_classes"))
    try:
        return cls(in_shape=tuple(in_shape), num_classes=num_classes, **params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}.kwargs: {exc}") from None


def build_timm(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """A timm model by name, random weights unless kwargs say pretrained: true, with in_chans from the data."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{where}.source: 'timm' is not installed (pip install 'kdkit[vision]')") from None
    if not timm.is_model(name):
        from kdkit.registry import suggest

        raise ConfigError(f"{where}.name: timm has no model {name!r}{suggest(name, timm.list_models())}")
    kwargs = {"pretrained": False, **kwargs}
    return timm.create_model(name, num_classes=num_classes, in_chans=in_shape[0], **kwargs)


def build_torchvision(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """A torchvision model by name (torchvision.models.get_model)."""
    try:
        import torchvision
    except ImportError:
        raise ConfigError(f"{where}.source: 'torchvision' is not installed (pip install 'kdkit[vision]')") from None
    available = torchvision.models.list_models()
    if name not in available:
        from kdkit.registry import suggest

        raise ConfigError(f"{where}.name: torchvision has no model {name!r}{suggest(name, available)}")
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    if in_shape and in_shape[0] != 3:
        _set_input_channels(model, int(in_shape[0]), f"{where}.name")
    return model


def _set_input_channels(model: nn.Module, channels: int, where: str) -> None:
    """torchvision networks are built for RGB; for data of other channel counts (grey MNIST), the first convolution
    (the stem, the first module taking 3 channels) is replaced by one of the same geometry taking `channels` (what
    timm's `in_chans` does for random weights)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != 3 or module.groups != 1:
                break
            stem = nn.Conv2d(
                channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, stem)
            return
    raise ConfigError(f"{where}: cannot find the RGB stem convolution of this network to take {channels} channels")


def build_kdkit_folder(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """A model folder written by kdkit (model.json + weights): rebuilt as recorded, trained weights loaded."""
    return load_model_folder(path, where=f"{where}.path")


def build_hf(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """A transformers sequence classifier from a folder or hub id (`path`)."""
    from kdkit.models.hf import build_hf_classifier

    return build_hf_classifier(path, num_classes, kwargs, pretrained, where)


Builder = Callable[[str | None, str | None, dict, tuple, int, bool, str], nn.Module]


def check_builtin(name: str | None, kwargs: dict, where: str) -> None:
    """The name and kwargs of a built-in net, without building it."""
    cls = lookup(BUILTIN_MODELS, name, f"{where}.name")
    bind(cls.__init__, kwargs, f"{where}.kwargs", provided=("in_shape", "num_classes"))


def _checked_when_built(name: str | None, kwargs: dict, where: str) -> None:
    """Libraries (timm, torchvision, transformers) and folders are only checked when the model is built."""


@dataclass(frozen=True)
class ModelSource:
    """How kdkit makes the networks of one `model.source`.

    build: the Builder.
    check: (name, kwargs, where) → None or a ConfigError; what can be checked without building (kdkit validate).
    folder: the source is a kdkit model folder: it holds trained weights and its own spec (model.json).
    """

    build: Builder
    check: Callable[[str | None, dict, str], None] = _checked_when_built
    folder: bool = False


# The keys are exactly the values of kdkit.config.ModelSpec.source (a test checks it).
MODEL_SOURCES: dict[str, ModelSource] = {
    "builtin": ModelSource(build_builtin, check=check_builtin),
    "timm": ModelSource(build_timm),
    "torchvision": ModelSource(build_torchvision),
    "kdkit": ModelSource(build_kdkit_folder, folder=True),
    "hf": ModelSource(build_hf),
}


def build_model(
    source: str,
    name: str | None,
    kwargs: dict[str, Any],
    in_shape: tuple[int, ...],
    num_classes: int,
    path: str | None = None,
    checkpoint: str | None = None,
    where: str = "model",
    pretrained: bool = True,
) -> nn.Module:
    """Build a network for inputs of `in_shape` and `num_classes` outputs; load `checkpoint` weights if given."""
    entry = lookup(MODEL_SOURCES, source, f"{where}.source")
    model = entry.build(name, path, kwargs, tuple(in_shape), num_classes, pretrained, where)
    if checkpoint:
        load_weights(model, checkpoint, f"{where}.checkpoint")
    return model


def check_model(source: str, name: str | None, kwargs: dict[str, Any], where: str) -> None:
    """Check what can be checked of a model section without building it: the source, and for built-in nets the
    name and kwargs. Raises ConfigError (every kwargs problem in its details)."""
    lookup(MODEL_SOURCES, source, f"{where}.source").check(name, dict(kwargs), where)


def comes_trained(source: str, checkpoint: str | None) -> bool:
    """The model arrives with trained weights (a checkpoint, or a kdkit folder), so a teacher member is not
    trained (the config's `trained: true` says the same of other sources)."""
    return bool(checkpoint) or lookup(MODEL_SOURCES, source, "model.source").folder


def load_weights(model: nn.Module, path: str | Path, where: str) -> None:
    """Load a .safetensors file or a .pt/.pth state dict (weights_only: nothing is unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: file {str(p)!r} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error type for a damaged or foreign file
            raise ConfigError(f"{where}: could not read {str(p)!r} as safetensors: {exc}".splitlines()[0]) from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                f"{where}: could not read {str(p)!r} as a weights-only state dict: {exc}".splitlines()[0]
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}; file vs model)")
        raise CompatibilityError(f"{where}: {p.name} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def save_model_folder(model: nn.Module, folder: str | Path, spec: dict[str, Any]) -> Path:
    """Write model.safetensors + model.json (spec: source, name, kwargs, in_shape, num_classes, ...) atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if callable(getattr(model, "save_pretrained", None)):  # a transformers classifier: its own folder format
        model.save_pretrained(str(folder), safe_serialization=True)
        write_json(folder / "model.json", {**spec, "format": "hf"})
        return folder
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_with(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json(folder / "model.json", spec)
    return folder


def read_model_json(path: str | Path | None, where: str = "model.path") -> dict[str, Any]:
    """The spec of a kdkit model folder (model.json), or a ConfigError naming the field and the folder."""
    folder = Path(path or "")
    spec_path = folder / "model.json"
    if not spec_path.is_file():
        raise ConfigError(f"{where}: {str(folder)!r} is not a kdkit model folder (no model.json)")
    try:
        spec = json.loads(spec_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{where}: {spec_path} is not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {spec_path} holds {type(spec).__name__}; expected a JSON object")
    return spec


def load_model_folder(path: str | Path | None, where: str = "model.path") -> nn.Module:
    folder = Path(path or "")
    spec_path = folder / "model.json"
    spec = read_model_json(folder, where)
    recorded = MODEL_SOURCES.get(spec.get("source"))  # an unknown source fails in build_model, with suggestions
    if recorded is not None and recorded.folder:
        raise ConfigError(f"{where}: {spec_path} points to another folder; expected a concrete model spec")
    if spec.get("format") == "hf":
        from kdkit.models.hf import HFClassifier

        return HFClassifier.from_pretrained(str(folder), where)
    model = build_model(
        spec["source"],
        spec["name"],
        spec.get("kwargs", {}),
        tuple(spec["in_shape"]),
        int(spec["num_classes"]),
        where=where,
    )
    load_weights(model, folder / "model.safetensors", where)
    return model


def model_spec(
    source: str,
    name: str | None,
    kwargs: dict,
    in_shape,
    num_classes: int,
    path: str | None = None,
    where: str = "model.path",
) -> dict:
    """What save_model_folder records; for a model loaded from a kdkit folder, the folder's own spec."""
    if lookup(MODEL_SOURCES, source, "model.source").folder:
        return read_model_json(path, where)
    return {
        "source": source,
        "name": name,
        "kwargs": dict(kwargs),
        "in_shape": list(in_shape),
        "num_classes": num_classes,
    }


def output_classes(model: nn.Module, example: torch.Tensor, where: str) -> int:
    """Run one example through the model (eval, no grad) and return its class count; shape errors become clear."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(example)
    except RuntimeError as exc:
        raise CompatibilityError(
            f"{where}: the model cannot take inputs of shape {tuple(example.shape[1:])}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", out)
    if logits.dim() != 2:
        raise CompatibilityError(f"{where}: the model returns shape {tuple(logits.shape)}; expected (batch, classes)")
    return int(logits.shape[-1])
