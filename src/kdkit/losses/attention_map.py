"""Self-attention map distillation (MiniLM, TinyBERT): KL(teacher ‖ student) of each query's attention row.

What a user must set, for transformers models (checked on transformers 5.23 with BertModel):
  - the models must run eager attention: `attn_implementation="eager"` in `from_pretrained(...)` or in the config
    (`BertConfig(..., attn_implementation="eager")`), or `model.set_attn_implementation("eager")`. With "sdpa" (the
    default) or flash attention the self-attention module returns (context, None): no probabilities exist, even
    with output_attentions=True. resolve() checks this and raises a CompatibilityError saying so.
  - nothing else: in eager mode BertSelfAttention always returns (context, probabilities (B, H, T, T)), so a
    forward hook reads element 1 without output_attentions. The paths are "encoder.layer.{i}.attention.self#1"
    (BertModel), "bert.encoder.layer.{i}.attention.self#1" (BertFor...); resolve() builds them from layer indices.
  - the student's probabilities are taken after its attention dropout (that is what the module returns); set the
    student's attention_probs_dropout_prob to 0 for a clean target match (rows are renormalised either way).
"""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, ParamError, choice
from kdkit.models.taps import get_feature, layer_pairs, parse_layer_map, resolve_module, split_path
from kdkit.types import Batch, ModelOutputs

# Self-attention submodules inside one transformer block that return (context, probabilities), tried in order:
# BERT/RoBERTa ("attention.self"), LLaMA/Mistral/BART ("self_attn"), GPT-2 ("attn"), DistilBERT ("attention").
ATTENTION_MODULES = ("attention.self", "self_attn", "attn", "attention", "self_attention")


class AttentionMap(Loss):
    """Mean over layer pairs of attention_map_kl(student probs, teacher probs, attention_mask, head_reduce).

    layer_map: "uniform", {student index: teacher index} or {student path: teacher path} where paths name the
    self-attention modules with "#1" (their second output), e.g. {"encoder.layer.1.attention.self#1":
    "encoder.layer.3.attention.self#1"}. With indices, the block lists are found as in hidden_state (or given as
    student_container / teacher_container) and the self-attention module inside a block is the first of
    ATTENTION_MODULES that exists, or `attention_module` (a path relative to the block) when given.
    Head counts may differ; see functional.attention_map_kl for how heads are grouped.
    """

    name = "attention_map"
    reads_logits = False

    def __init__(
        self,
        layer_map: str | dict[int, int] | dict[str, str] = "uniform",
        head_reduce: str = "mean",
        student_container: str | None = None,
        teacher_container: str | None = None,
        attention_module: str | None = None,
    ):
        super().__init__()
        self.layer_map = parse_layer_map(layer_map)
        choice("head_reduce", head_reduce, ("mean", "all"))
        by_path = self._by_path()
        if by_path and (student_container, teacher_container, attention_module) != (None, None, None):
            raise ValueError(
                "student_container/teacher_container/attention_module apply to layer indices or 'uniform', not paths"
            )
        if attention_module is not None and (not isinstance(attention_module, str) or not attention_module):
            raise ParamError("attention_module", attention_module, "a module path inside a block")
        self.head_reduce = head_reduce
        self.student_container = student_container
        self.teacher_container = teacher_container
        self.attention_module = attention_module
        self.pairs: list[tuple[str, str]] | None = list(self.layer_map.items()) if by_path else None

    def _by_path(self) -> bool:
        return isinstance(self.layer_map, dict) and all(isinstance(k, str) for k in self.layer_map)

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        if not self._by_path():
            blocks = layer_pairs(
                self.layer_map,
                student_model,
                teacher_models,
                "attention_map",
                self.student_container,
                self.teacher_container,
            )
            self.pairs = [
                (
                    self._attention_path(student_model, s, "student"),
                    self._attention_path(teacher_models[0], t, "teacher"),
                )
                for s, t in blocks
            ]
        for s, t in self.pairs:
            _check_eager(student_model, s, "student")
            for model in teacher_models:
                _check_eager(model, t, "teacher")

    def _attention_path(self, model: nn.Module, block: str, side: str) -> str:
        names = dict(model.named_modules())
        candidates = (self.attention_module,) if self.attention_module else ATTENTION_MODULES
        for c in candidates:
            if f"{block}.{c}" in names:
                return f"{block}.{c}#1"
        raise CompatibilityError(
            f"attention_map: no self-attention module in {side} block {block!r} (looked for "
            f"{', '.join(candidates)}); set attention_module or give module paths in layer_map"
        )

    def _pairs(self) -> list[tuple[str, str]]:
        if self.pairs is None:
            raise RuntimeError("attention_map: resolve() turns layer indices into paths; call it first")
        return self.pairs

    def feature_paths(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self._pairs()], [t for _, t in self._pairs()]

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        for side, shapes, paths in zip(("student", "teacher"), (student_shapes, teacher_shapes), self.feature_paths()):
            for path in paths:
                _check_probs(path, shapes[path], side, with_batch=False)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        pairs = self._pairs()
        total = 0.0
        for s_path, t_path in pairs:
            s = get_feature(student.features, s_path, "attention_map (student)")
            t = get_feature(teacher.features, t_path, "attention_map (teacher)")
            _check_probs(s_path, s.shape, "student", with_batch=True)
            _check_probs(t_path, t.shape, "teacher", with_batch=True)
            total = total + Fk.attention_map_kl(s, t, batch.attention_mask, self.head_reduce)
        return total / len(pairs)

    def describe(self) -> str:
        layers = "uniform" if self.layer_map == "uniform" else f"{len(self.layer_map)} layers"
        return f"attention_map(kl, {layers}, heads={self.head_reduce})"


def _check_probs(path: str, shape: torch.Size, side: str, with_batch: bool) -> None:
    """Attention probabilities are (B,) H, T, T; anything else means the path taps the wrong output."""
    dims = tuple(shape)[1:] if with_batch else tuple(shape)
    if len(dims) != 3 or dims[1] != dims[2]:
        raise CompatibilityError(
            f"attention_map: {side} feature {path!r} has shape {tuple(shape)}; expected attention probabilities "
            "(B, H, T, T): tap a self-attention module's element 1, e.g. 'encoder.layer.0.attention.self#1', "
            "with attn_implementation='eager'"
        )


def _check_eager(model: nn.Module, path: str, side: str) -> None:
    """transformers modules carry their config; only eager attention returns probabilities."""
    module_path, _ = split_path(path, f"attention_map ({side})")
    _, module = resolve_module(model, module_path, f"attention_map ({side})")
    config = getattr(module, "config", None)
    config = config if config is not None else getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl != "eager":
        raise CompatibilityError(
            f"attention_map: the {side} model runs {impl!r} attention, which returns no attention probabilities "
            f"at {path!r}; load it with attn_implementation='eager' (from_pretrained(..., attn_implementation="
            "'eager'), or model.set_attn_implementation('eager'))"
        )
