"""Width pruning of Llama-family causal LMs by activation importance (Minitron), for "pruned students".

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation") ranks the
units of a trained LM by how large their activations are on a little calibration text, keeps the most important
ones, and distils into the smaller model. Three widths are pruned, each in its original order:

- MLP channels, per layer: mean |act(gate(x)) * up(x)| (the input of down_proj) over real tokens;
- attention heads, per layer, in whole KV groups (grouped-query attention: a KV head is pruned together with the
  query heads that read it): the L2 norm over head_dim of each head's attention output (the input of o_proj),
  averaged over real tokens and summed over the query heads of a group;
- hidden (embedding) channels, one set for the whole residual stream: mean |output| of every RMSNorm, summed.

`lm_importance` measures, `prune_lm` slices a new model, `pruned_params` counts the parameters of a pruning
without building it (to match, say, a layer-dropped student's size).

RMSNorm divides by the root of the mean square over the hidden channels, so removing channels changes that mean
even where the removed channels are zero. `prune_lm` compensates exactly: every norm weight is multiplied by
sqrt(d / d') and `rms_norm_eps` by d / d' (d, d': hidden size before and after). Then removing channels that are
zero in the residual stream leaves the model's function unchanged, and removing weak ones keeps the norms' output
scale instead of shrinking it by sqrt(d' / d).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.errors import CompatibilityError, ConfigError, DataError
from kdkit.models.causal_lm import decoder_layers

# model_type values whose modules have exactly the Llama layout and plain RMSNorm (weight * x / rms). Gemma has the
# same module names but scales its embeddings by sqrt(hidden) and its norms by (1 + weight): not here on purpose.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# How each parameter is sliced: one entry per axis, naming the kept-index set of that axis (None: kept whole).
# "hidden": kept hidden channels; "mlp": kept MLP channels; "q" / "kv": rows of the kept query / key-value heads.
LAYER_SLICES = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "mlp.gate_proj.weight": ("mlp", "hidden"),
    "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "hidden"),
    "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("hidden", "mlp"),
    "mlp.down_proj.bias": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
}
TOP_SLICES = {
    "model.embed_tokens.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": (None, "hidden"),
}
NORM_WEIGHTS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")
LAYERS_PREFIX = "model.layers."


@dataclass(frozen=True)
class LMImportance:
    """Activation importance of one model's units, fp32 on the CPU (higher: more important).

    mlp[l]: (intermediate_size,) per layer; heads[l]: (num_key_value_heads,) per layer, one score per KV group;
    hidden: (hidden_size,); tokens: how many real (unpadded) tokens the means are over.
    """

    mlp: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...]
    hidden: torch.Tensor
    tokens: int


def llama_layers(model: nn.Module, where: str = "prune") -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (LLAMA_FAMILY); anything else → one CompatibilityError."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise CompatibilityError(
            f"{where}: {type(model).__name__} (model_type {model_type!r}) is not a Llama-family causal LM; width "
            f"pruning supports model_type {', '.join(LLAMA_FAMILY)}"
        )
    prefix, layers = decoder_layers(model, where)
    if prefix != LAYERS_PREFIX.rstrip(".") or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise CompatibilityError(
            f"{where}: {type(model).__name__} has no model.layers and lm_head; expected a *ForCausalLM of the "
            "Llama layout"
        )
    return layers


# ---------------------------------------------------------------------------------------------------------- importance


def _batch_inputs(batch: Any, device: torch.device, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, real-token mask as bool), both (B, T) on `device`, from a tensor or a dict with input_ids."""
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    ids = torch.as_tensor(ids)
    if ids.dim() != 2:
        raise DataError(f"{where}: a batch of input_ids has shape {tuple(ids.shape)}; expected (batch, tokens)")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if mask.shape != ids.shape:
        raise DataError(f"{where}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def lm_importance(model: nn.Module, batches: Iterable[Any], where: str = "prune.calibration") -> LMImportance:
    """Activation importance of `model`'s MLP channels, KV groups and hidden channels over `batches`.

    batches: (B, T) LongTensors of input_ids, or dicts with input_ids and attention_mask (1: real token). Padded
    positions count nowhere; left padding is fine too (rotary attention depends on relative positions only, so a
    row shifted right by its padding gives the same activations). The model runs in eval mode without gradients;
    its mode is restored afterwards.
    """
    layers = llama_layers(model, where)
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    real: dict[str, torch.Tensor] = {}  # the current batch's real-token mask (B, T), read by the hooks
    sums: dict[Any, torch.Tensor] = {}  # unit → sum over real tokens, float64

    def add(key: Any, values: torch.Tensor) -> None:  # values (N, C): one row per real token
        total = values.sum(0, dtype=torch.float64)
        sums[key] = sums[key] + total if key in sums else total

    def mlp_hook(i: int):
        return lambda module, args: add(("mlp", i), args[0][real["mask"]].abs())

    def heads_hook(i: int):  # o_proj input (B, T, heads * head_dim) → per-head L2 norm (N, heads)
        return lambda module, args: add(
            ("heads", i), args[0][real["mask"]].unflatten(-1, (heads, -1)).float().norm(dim=-1)
        )

    def norm_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        add("hidden", output[real["mask"]].abs())

    hooks = [model.model.norm.register_forward_hook(norm_hook)]
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_hook(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(norm_hook))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(norm_hook))
    was_training, device, tokens = model.training, next(model.parameters()).device, 0
    model.eval()
    try:
        for batch in batches:
            ids, mask = _batch_inputs(batch, device, where)
            real["mask"] = mask
            # The base model only: the final norm is its last module, and the logits are not needed.
            model.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            tokens += int(mask.sum())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise DataError(f"{where}: the calibration batches hold no real tokens; expected at least one")

    def mean(key: Any) -> torch.Tensor:
        return (sums[key] / tokens).float().cpu()

    return LMImportance(
        mlp=tuple(mean(("mlp", i)) for i in range(len(layers))),
        heads=tuple(mean(("heads", i)).view(kv, heads // kv).sum(1) for i in range(len(layers))),
        hidden=mean("hidden"),
        tokens=tokens,
    )


# ---------------------------------------------------------------------------------------------------------- sizes


def _check_size(value: int | None, full: int, name: str, where: str) -> int:
    """`value` (None: `full`) if it is an int in 1..full; else one ConfigError line."""
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
        raise ConfigError(f"{where}.{name}: {value}; expected 1..{full}")
    return value


def pruned_config(
    config: Any,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    hidden_size: int | None = None,
    where: str = "prune",
) -> Any:
    """A copy of a Llama-family `config` (or a model's) with the pruned widths (None: kept). num_attention_heads
    shrinks with num_key_value_heads so the GQA ratio stays, head_dim stays, rms_norm_eps is rescaled (module
    docstring). The config class's own validators run; their complaint becomes one ConfigError line."""
    config = getattr(config, "config", config)
    if getattr(config, "model_type", None) not in LLAMA_FAMILY:
        raise CompatibilityError(
            f"{where}: {type(config).__name__} (model_type {getattr(config, 'model_type', None)!r}) is not a "
            f"Llama-family configuration; width pruning supports model_type {', '.join(LLAMA_FAMILY)}"
        )
    kv_old, d_old = config.num_key_value_heads, config.hidden_size
    inter = _check_size(intermediate_size, config.intermediate_size, "intermediate_size", where)
    kv = _check_size(num_key_value_heads, kv_old, "num_key_value_heads", where)
    hidden = _check_size(hidden_size, d_old, "hidden_size", where)
    new = copy.deepcopy(config)
    new.head_dim = getattr(config, "head_dim", None) or d_old // config.num_attention_heads
    new.intermediate_size = inter
    new.num_attention_heads = kv * (config.num_attention_heads // kv_old)
    new.num_key_value_heads = kv
    new.hidden_size = hidden
    new.rms_norm_eps = config.rms_norm_eps * d_old / hidden
    validate = getattr(new, "validate", None)  # transformers 5's strict configs; 4.x has none
    try:
        if validate is not None:
            validate()
    except Exception as exc:  # huggingface_hub's StrictDataclassClassValidationError wraps the validator's ValueError
        cause = str(exc.__cause__ or exc).strip().splitlines()[0][:200]
        raise ConfigError(
            f"{where}: {cause} (after pruning to hidden_size {hidden}, num_key_value_heads {kv}); choose sizes "
            f"that {type(config).__name__} accepts"
        ) from None
    return new


def pruned_params(
    config: Any,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    hidden_size: int | None = None,
    where: str = "prune",
) -> int:
    """The parameter count (tied weights once) of `prune_lm` with these sizes, from the config alone: the model is
    built on the meta device, which allocates and initialises nothing."""
    from transformers import AutoModelForCausalLM

    new = pruned_config(config, intermediate_size, num_key_value_heads, hidden_size, where)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(new)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------- pruning


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the earlier index wins)."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of the kept units when each unit is `size` consecutive rows (a head is head_dim rows)."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def _check_importance(importance: LMImportance, config: Any, where: str) -> None:
    n, inter, kv, d = config.num_hidden_layers, config.intermediate_size, config.num_key_value_heads, config.hidden_size
    fits = (
        len(importance.mlp) == n
        and len(importance.heads) == n
        and all(s.shape == (inter,) for s in importance.mlp)
        and all(s.shape == (kv,) for s in importance.heads)
        and importance.hidden.shape == (d,)
    )
    if not fits:
        raise CompatibilityError(
            f"{where}.importance: measured on another shape ({len(importance.mlp)} layers, hidden "
            f"{tuple(importance.hidden.shape)[0]}); expected {n} layers, intermediate {inter}, {kv} KV heads, "
            f"hidden {d} (run lm_importance on this model)"
        )


def _kept(importance: LMImportance, config: Any, new: Any) -> dict[Any, torch.Tensor]:
    """Kept indices per slicing kind: "hidden", and ("mlp" | "q" | "kv", layer) for every layer."""
    head_dim, rep = new.head_dim, config.num_attention_heads // config.num_key_value_heads
    keep: dict[Any, torch.Tensor] = {"hidden": _top(importance.hidden, new.hidden_size)}
    for i, (mlp, groups) in enumerate(zip(importance.mlp, importance.heads)):
        keep["mlp", i] = _top(mlp, new.intermediate_size)
        kv_heads = _top(groups, new.num_key_value_heads)
        keep["kv", i] = _rows(kv_heads, head_dim)
        keep["q", i] = _rows(_rows(kv_heads, rep), head_dim)  # query heads j*rep .. j*rep+rep-1 read KV head j
    return keep


def _slice(key: str, tensor: torch.Tensor, keep: dict[Any, torch.Tensor], where: str) -> torch.Tensor:
    """The kept part of one state-dict entry (always a new tensor); a parameter outside the Llama layout is a
    CompatibilityError (slicing it wrongly would be silent)."""
    layer, rule = None, TOP_SLICES.get(key)
    if key.startswith(LAYERS_PREFIX):
        index, _, rest = key.removeprefix(LAYERS_PREFIX).partition(".")
        layer, rule = int(index), LAYER_SLICES.get(rest)
    if rule is None:
        raise CompatibilityError(
            f"{where}: the model has {key!r}, which width pruning cannot slice; expected only the Llama layout "
            f"({', '.join(TOP_SLICES)}, and per layer {', '.join(LAYER_SLICES)})"
        )
    tensor = tensor.detach().clone()
    for axis, kind in enumerate(rule):
        if kind is not None:
            index = keep[kind] if kind == "hidden" else keep[kind, layer]
            tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor


def _empty_like(model: nn.Module, config: Any) -> nn.Module:
    """A fresh model of `model`'s class for `config`, on its device and in its dtype, with copies of its buffers
    (rotary frequencies depend on head_dim only, which pruning keeps) and of its generation config."""
    param = next(model.parameters())
    with torch.device(param.device):
        new = type(model)(config)
    new.to(param.dtype)
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        setattr(new.get_submodule(owner), leaf, buffer.clone())
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.train(model.training)


def prune_lm(
    model: nn.Module,
    importance: LMImportance,
    *,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    hidden_size: int | None = None,
    where: str = "prune",
) -> nn.Module:
    """A new, narrower copy of a Llama-family causal LM that keeps its most important units (`importance`, from
    `lm_importance` on this model) in their original order; None keeps that width.

    Sliced: gate/up rows and down columns (MLP channels, per layer); k/v rows of the kept KV heads, q rows and o_proj
    columns of their query heads (per layer; num_attention_heads shrinks by the same ratio, head_dim stays); the
    hidden channels everywhere (embedding and lm_head columns, norm weights, q/k/v/gate/up input columns, o/down
    output rows). Norm weights and rms_norm_eps are rescaled for the smaller hidden size (module docstring). Tied
    embeddings stay tied. The copy shares no tensors with `model`, runs `generate`, and survives save_pretrained /
    from_pretrained.
    """
    llama_layers(model, where)
    config = model.config
    new_config = pruned_config(config, intermediate_size, num_key_value_heads, hidden_size, where)
    _check_importance(importance, config, where)
    keep = _kept(importance, config, new_config)
    state = {key: _slice(key, tensor, keep, where) for key, tensor in model.state_dict().items()}
    scale = math.sqrt(config.hidden_size / new_config.hidden_size)
    for key, tensor in state.items():
        if key.endswith(NORM_WEIGHTS):
            tensor.mul_(scale)
    new = _empty_like(model, new_config)
    new.load_state_dict(state, strict=True)
    return new
