"""Quantization-aware training (QAT): the student trains through the int8 rounding that `kdkit export --quantize
int8` will apply later, so that its weights learn to live with it; then the rounding is taken off again.

    qat = prepare_qat(student, start_batch=0)   # in place: fake int8 on every Linear/Conv and on the logits
    ... train as usual (the engine needs to know nothing) ...
    strip_qat(student)                          # in place: the original module, float weights, nothing added

What is simulated is what onnxruntime.quantization.quantize_static does with kdkit's settings
(kdkit.export.quantize.quantize_static_qdq, measured on the graphs it writes for the builtin students):

- the weight of every Linear and Conv: int8 per output channel, symmetric in [-64, 64] (7 bits: the export's
  reduce_range, which keeps ONNX Runtime's int16 sums from saturating on CPUs without VNNI), scale max|w| / 64 of
  the current weights (ONNX Runtime takes the same from the final ones), with torch.fake_quantize_per_channel_affine
  in a parametrization (torch.nn.utils.parametrize), so the layer and its Parameter objects stay the student's own;
- the input of every Linear, Conv and pooling layer and the model's output (ONNX Runtime quantizes the logits
  too): uint8 per tensor, asymmetric, scale and zero point computed as ONNX Runtime computes them, from a range
  that is a moving min/max over the training batches (ONNX Runtime calibrates the same tensors with the min/max of
  256 training examples), with torch.fake_quantize_per_tensor_affine. A ReLU after a layer is fused by ONNX
  Runtime, so its output, the next layer's input, is what it quantizes: the same tensor this hooks.

Given the same ranges, the fake int8 logits equal ONNX Runtime's int8 logits of the exported student (to 1e-4 on
the builtin MLP and small CNN: tests/unit/models/test_qat.py). Gradients pass the rounding unchanged inside the
range (the straight-through estimator). Not simulated: the int32 bias (its rounding is ~1e-7 of the output),
BatchNorm folding (per-channel symmetric scales round a channel's folded weight w·γ/σ exactly as they round w, so
there is nothing to simulate), and tensors that feed no Linear, Conv or pooling layer (the two branches of a
residual Add, which ONNX Runtime also quantizes).

Why not torch.ao.quantization (prepare_qat_fx with the x86 or qnnpack qconfig): torch 2.13 announces its removal
(migrate to torchao's PT2E, not installed here); it traces the student into a GraphModule and swaps its layers for
QAT modules (nnqat.Linear, fused ConvBnReLU2d), so feature taps registered on the student's modules stop firing and
the saved folder would need its weights mapped back onto the architecture; and its x86 qconfig rounds activations
to 7 bits (reduce_range), where ONNX Runtime's export rounds weights to 7 bits and activations to 8. Here the
student keeps its modules: hooks add the rounding, core torch ops do it, and removing them gives back exactly the
original network, which saves and loads as any student.

The quantizers hang under the model as `kdkit_qat` (they move with .to(), and their ranges and the count of
training batches are in state_dict(): the engine's checkpoints and kept-best state carry them, and a resumed run
continues them). In training, rounding starts after `start_batch` forwards (an fp32 warm-up; ranges are observed
from the first batch). In eval mode it applies as soon as ranges exist, warm-up included: validation always measures
the student as int8 will run it, and train.keep_best selects by that (so a kept warm-up epoch is its best int8 state).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from kdkit.errors import CompatibilityError

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what ONNX Runtime runs as int8 (Gemm/MatMul, Conv)
# Pooling: ONNX Runtime quantizes its input as well (QDQ around MaxPool, AveragePool, GlobalAveragePool); only the
# activation is rounded there, so the tensor a CNN pools before its head is rounded twice, as in the int8 graph.
POOLING_LAYERS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
WEIGHT_RANGE = (-64, 64)  # int8 with reduce_range, symmetric: ONNX Runtime's range for the export's weights
ACTIVATION_RANGE = (0, 255)  # uint8, asymmetric
ATTRIBUTE = "kdkit_qat"


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """w (out, ...) rounded to int8 per output channel (symmetric, scale max|w_c| / 64) and back to float."""
    qmin, qmax = WEIGHT_RANGE
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim()))).float() / qmax
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero channel stays zero
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, qmin, qmax)


class WeightFakeQuant(nn.Module):
    """A parametrization of a layer's weight: fake_quant_weight while `active`, the weight itself otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w) if self.active else w


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point int32) of uint8 over the range [lo, hi] widened to hold 0, computed as ONNX
    Runtime's quant_utils.compute_scale_zp does (in float64: scale (hi − lo) / 255, zero point round(−lo / scale);
    a range too small for a float32 scale gets scale 1, zero point 0)."""
    qmin, qmax = ACTIVATION_RANGE
    lo, hi = lo.double().clamp(max=0), hi.double().clamp(min=0)
    scale = (hi - lo) / (qmax - qmin)
    tiny = scale < torch.finfo(torch.float32).tiny
    zero = torch.where(tiny, 0.0, torch.round(qmin - lo / scale)).clamp(qmin, qmax)
    return torch.where(tiny, 1.0, scale).float().reshape(1), zero.int().reshape(1)


class ActivationFakeQuant(nn.Module):
    """uint8 per-tensor fake quantization of one activation. Its range [lo, hi] is the first training batch's
    min/max, then a moving average (lo += momentum · (batch min − lo), as torch's MovingAverageMinMaxObserver);
    `observe` and `quantize` are set by QAT.tick before every forward. `before` is a forward pre-hook (a layer's
    first input), `after` a forward hook (a model's output)."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.observe = self.quantize = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                first = torch.isinf(self.lo)  # no batch seen yet (no host sync: both branches are computed)
                self.lo.copy_(torch.where(first, lo, self.lo + self.momentum * (lo - self.lo)))
                self.hi.copy_(torch.where(first, hi, self.hi + self.momentum * (hi - self.hi)))
        if not self.quantize:
            return x
        qmin, qmax = ACTIVATION_RANGE
        scale, zero = activation_qparams(self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)

    def before(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def after(self, module: nn.Module, args: tuple, output):
        if not isinstance(output, torch.Tensor):
            raise CompatibilityError(
                f"student.qat: the student returns {type(output).__name__}; quantization-aware training expects a "
                "logits tensor (batch, classes)"
            )
        return self(output)


class QAT(nn.Module):
    """The fake quantizers of one model and the count of its training forwards (see the module docstring).

    paths: the quantized layers' module paths; start_batch: training forwards in fp32 before rounding starts;
    freeze_batch: training forwards after which ranges stop moving (None: never)."""

    def __init__(self, paths: list[str], start_batch: int, freeze_batch: int | None, momentum: float) -> None:
        super().__init__()
        self.paths = list(paths)
        self.start_batch, self.freeze_batch = int(start_batch), freeze_batch
        self.inputs = nn.ModuleList(ActivationFakeQuant(momentum) for _ in self.paths)
        self.output = ActivationFakeQuant(momentum)
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))  # training forwards so far
        self._weights: list[WeightFakeQuant] = []
        self._handles: list = []

    @property
    def quantizing(self) -> bool:
        """The rounding is on (in training from start_batch; in eval once any training batch has been seen, so that
        validation, and train.keep_best with it, always measures the student as int8 will run it)."""
        return self.output.quantize

    def tick(self, model: nn.Module, args: tuple) -> None:
        """The model's forward pre-hook: count a training forward and switch rounding and range tracking."""
        seen = int(self.batches)
        if model.training:
            quantize = seen >= self.start_batch
            observe = self.freeze_batch is None or seen < self.freeze_batch
            self.batches += 1
        else:  # evaluation: int8 as the export will run it (once ranges exist), ranges untouched by validation data
            quantize, observe = seen > 0, False
        for q in (*self.inputs, self.output):
            q.quantize, q.observe = quantize, observe
        for w in self._weights:
            w.active = quantize

    def describe(self) -> str:
        freeze = f", ranges fixed from batch {self.freeze_batch}" if self.freeze_batch is not None else ""
        return (
            f"fake int8 on {len(self.paths)} layers ({', '.join(self.paths[:4])}{', ...' * (len(self.paths) > 4)}) "
            "and the logits: weights int8 per "
            f"channel (symmetric), inputs uint8 per tensor; from training batch {self.start_batch}{freeze}"
        )


def prepare_qat(
    model: nn.Module, start_batch: int = 0, freeze_batch: int | None = None, momentum: float = 0.01
) -> QAT:
    """Fake int8 in place on every Linear/Conv layer of `model`, the inputs of its pooling layers and its output;
    returns the quantizers (also `model.kdkit_qat`). Refuses (CompatibilityError, one line) a transformers model,
    a container as the model itself, a model without Linear/Conv layers, or a weight already parametrized."""
    check_student(model)
    if hasattr(model, ATTRIBUTE):
        raise CompatibilityError("student.qat: the student is already prepared for quantization-aware training")
    layers = {path: m for path, m in model.named_modules() if isinstance(m, (*WEIGHTED_LAYERS, *POOLING_LAYERS))}
    weighted = [path for path, m in layers.items() if isinstance(m, WEIGHTED_LAYERS)]
    if not weighted:
        raise CompatibilityError(
            f"student.qat: the student ({type(model).__name__}) has no Linear or Conv layer to quantize"
        )
    taken = [path for path in weighted if parametrize.is_parametrized(layers[path], "weight")]
    if taken:
        raise CompatibilityError(f"student.qat: the weight of {taken[0]} is already parametrized (e.g. weight norm)")
    qat = QAT(list(layers), start_batch, freeze_batch, momentum)
    model.add_module(ATTRIBUTE, qat)
    qat._handles.append(model.register_forward_pre_hook(qat.tick))
    for layer, quant in zip(layers.values(), qat.inputs):
        qat._handles.append(layer.register_forward_pre_hook(quant.before))
        if isinstance(layer, WEIGHTED_LAYERS):
            weight = WeightFakeQuant()
            parametrize.register_parametrization(layer, "weight", weight)
            qat._weights.append(weight)
    qat._handles.append(model.register_forward_hook(qat.output.after))
    return qat


def strip_qat(model: nn.Module) -> nn.Module:
    """Undo prepare_qat in place: hooks removed, each weight back to its float Parameter, `kdkit_qat` gone; the
    model's class, modules and state_dict keys are then the original ones. A model never prepared is returned as is."""
    qat = getattr(model, ATTRIBUTE, None)
    if not isinstance(qat, QAT):
        return model
    for handle in qat._handles:
        handle.remove()
    for path in qat.paths:
        layer = model.get_submodule(path)
        if isinstance(layer, WEIGHTED_LAYERS):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    delattr(model, ATTRIBUTE)
    return model


def check_student(model: nn.Module) -> None:
    """Refuse what fake int8 cannot wrap: transformers models (text students, causal LMs: ONNX Runtime's int8
    export does not take token ids) and containers as the model (a child added to a Sequential would run)."""
    if callable(getattr(model, "save_pretrained", None)):
        raise CompatibilityError(
            f"student.qat: the student is a transformers model ({type(model).__name__}); quantization-aware "
            "training covers float-input classifiers (builtin mlp, small_cnn, resnet; timm, torchvision)"
        )
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise CompatibilityError(
            f"student.qat: the student is a bare {type(model).__name__}; wrap it in a module with its own forward"
        )
