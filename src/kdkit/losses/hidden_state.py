"""Hidden-state distillation between paired transformer layers (TinyBERT, DistilBERT): MSE or cosine per token."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, choice
from kdkit.models.adapters import make_adapter
from kdkit.models.taps import get_feature, layer_pairs, parse_layer_map
from kdkit.types import Batch, ModelOutputs


class HiddenState(Loss):
    """Mean over layer pairs of hidden_state_loss(proj(student layer i), teacher layer j, attention_mask, kind).

    layer_map: "uniform" (student layer i ↔ teacher layer round((i+1)·L_t/L_s) − 1, the last to the last),
    {student index: teacher index} (negative counts from the end), or {student path: teacher path}.
    Indices are turned into "container.i" paths by resolve(), with the containers found by
    kdkit.models.taps.layer_container (encoder.layer, bert.encoder.layer, model.layers, transformer.h, ...) or
    given as student_container / teacher_container. Each tapped output is a (T, D) hidden state; a Linear
    projection (trained with the student) maps the student's width to the teacher's when they differ.
    The mean over pairs keeps the scale independent of how many layers are paired; the weight sets it.
    """

    name = "hidden_state"
    reads_logits = False

    def __init__(
        self,
        layer_map: str | dict[int, int] | dict[str, str] = "uniform",
        kind: str = "mse",
        student_container: str | None = None,
        teacher_container: str | None = None,
    ):
        super().__init__()
        self.layer_map = parse_layer_map(layer_map)
        choice("kind", kind, ("mse", "cosine"))
        by_path = self._by_path()
        if by_path and (student_container is not None or teacher_container is not None):
            raise ValueError("student_container/teacher_container apply to layer indices or 'uniform', not to paths")
        self.kind = kind
        self.student_container = student_container
        self.teacher_container = teacher_container
        self.pairs: list[tuple[str, str]] | None = list(self.layer_map.items()) if by_path else None
        self.adapters = nn.ModuleList()

    def _by_path(self) -> bool:
        return isinstance(self.layer_map, dict) and all(isinstance(k, str) for k in self.layer_map)

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        if self._by_path():
            return  # module paths already; the taps check them
        self.pairs = layer_pairs(
            self.layer_map,
            student_model,
            teacher_models,
            "hidden_state",
            self.student_container,
            self.teacher_container,
        )

    def _pairs(self) -> list[tuple[str, str]]:
        if self.pairs is None:
            raise RuntimeError("hidden_state: resolve() turns layer indices into paths; call it first")
        return self.pairs

    def feature_paths(self) -> tuple[list[str], list[str]]:
        return [s for s, _ in self._pairs()], [t for _, t in self._pairs()]

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        adapters = []
        for s, t in self._pairs():
            shape_s, shape_t = tuple(student_shapes[s]), tuple(teacher_shapes[t])
            if len(shape_s) != 2 or len(shape_t) != 2:
                raise CompatibilityError(
                    f"hidden_state {s}→{t}: shapes {shape_s} and {shape_t}; expected (T, D) hidden states"
                )
            adapters.append(make_adapter(shape_s, shape_t, where=f"hidden_state {s}→{t}"))
        self.adapters = nn.ModuleList(adapters)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        pairs = self._pairs()
        if len(self.adapters) != len(pairs):
            raise RuntimeError("hidden_state: setup() builds the projections from the feature shapes; call it first")
        total = 0.0
        for (s_path, t_path), adapter in zip(pairs, self.adapters):
            s = adapter(get_feature(student.features, s_path, "hidden_state (student)"))
            t = get_feature(teacher.features, t_path, "hidden_state (teacher)")
            total = total + Fk.hidden_state_loss(s, t, batch.attention_mask, self.kind)
        return total / len(pairs)

    def describe(self) -> str:
        layers = "uniform" if self.layer_map == "uniform" else f"{len(self.layer_map)} layers"
        return f"hidden_state({self.kind}, {layers})"
