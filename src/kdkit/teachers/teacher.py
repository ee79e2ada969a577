"""A frozen teacher: always in eval mode, under inference_mode, never wrapped by DDP, outputs in fp32."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.models.lm_head import fusable_head, hidden_outputs
from kdkit.types import ModelOutputs

Log = Callable[[str], None]

# Folding BatchNorm is exact in real arithmetic; in float32 the outputs move by rounding only (~1e-7 of their size on
# a ResNet-110). A larger difference means the fold (or the traced graph) is wrong, and the teacher is kept unfolded.
FOLD_RTOL = 1e-4
FOLD_ATOL = 1e-6


class Teacher(nn.Module):
    """Wraps a trained network so that it can only be used for inference.

    precision: "fp32" or "bf16" autocast for the forward pass (outputs are returned in fp32).
    channels_last: store conv weights and run inputs in channels-last memory format (faster convolutions on CPU).
    fuse_bn: fold each BatchNorm into the convolution or linear layer before it (torch.fx), which a frozen teacher
    allows: the same outputs to float rounding, one pass over the activations less. The folded teacher is checked
    on `example` (a few inputs of the data, e.g. DataBundle.example(8)): its outputs must match the unfolded
    teacher's within FOLD_RTOL of their largest magnitude, or the teacher is kept unfolded. Whenever folding is
    asked for and does not happen in full (no example, nothing to fold, a model torch.fx cannot trace, outputs that
    differ, layers left unfolded) the reason is told through `log`, or `warnings.warn` without one. `self.fused`
    says whether the folded model is the one in use; it keeps the model's module paths, so feature taps still fire.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        channels_last: bool = False,
        fuse_bn: bool = False,
        example: torch.Tensor | None = None,
        log: Log | None = None,
        compile: str = "off",
    ):
        super().__init__()
        self.fused = False
        if fuse_bn:
            model, self.fused = fold_batchnorm(model, example, log)
        self.model = model
        self.taps = None
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()
        self.compiled = compile
        # What forward() calls: the model, or torch.compile of it. Kept out of the module tree (no second copy of
        # the weights in state_dict); taps, the fingerprint and hidden_forward use the plain model.
        object.__setattr__(self, "_run", self.model if compile == "off" else _compiled(self.model, compile))

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        *,
        precision: str = "fp32",
        channels_last: bool = False,
        fuse_bn: bool = False,
        example: torch.Tensor | None = None,
        device: str | torch.device | None = None,
        log: Log | None = None,
        compile: str = "off",
    ) -> Teacher:
        """One member as a run uses it, from the run's settings: distill.teacher_precision, distill.channels_last
        and distill.teacher_fuse_bn. Moves the model (and the example) to `device` first. `example`: a few inputs
        of the data, needed to check a BatchNorm fold (without one, fuse_bn leaves the model unfolded and says so).
        Training, evaluation, export and serving all build their teacher members here, so that they run the same
        teacher."""
        if device is not None:
            model = model.to(device)
            example = example.to(device) if example is not None else None
        return cls(model, precision, channels_last, fuse_bn, example=example, log=log, compile=compile)

    def train(self, mode: bool = True) -> Teacher:
        # A teacher stays in eval mode (BatchNorm statistics and dropout frozen), whatever the caller asks.
        return super().train(False)

    def _autocast(self, device_type: str):
        if self.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def tap(self, paths: list[str], where: str = "teacher") -> None:
        """Capture the outputs of these modules (by path) into ModelOutputs.features on every forward."""
        from kdkit.models.taps import FeatureTaps

        if self.taps is not None:
            self.taps.remove()
        self.taps = FeatureTaps(self.model, list(paths), where) if paths else None

    def forward(self, inputs: torch.Tensor) -> ModelOutputs:
        with torch.inference_mode():
            if self.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self._autocast(inputs.device.type):
                out = self._run(inputs)
            logits = getattr(out, "logits", out).float()
            features = self.taps.collect() if self.taps is not None else {}
        # Features leave inference mode as ordinary tensors (a clone), so that losses may save them for backward.
        return ModelOutputs(logits=logits, features={k: v.float().clone() for k, v in features.items()})

    def hidden_forward(self, inputs: torch.Tensor) -> ModelOutputs:
        """For the fused token losses: a causal LM's last hidden state and output head instead of its (B, T, V)
        logits (kdkit.models.lm_head), so that the losses make the teacher's logits a chunk at a time; any other
        model (or one whose head does not reproduce its logits) gives forward()'s outputs."""
        head = fusable_head(self.model)
        if head is None:
            return self.forward(inputs)
        with torch.inference_mode():
            with self._autocast(inputs.device.type):
                out = hidden_outputs(self.model, inputs, head)
            features = self.taps.collect() if self.taps is not None else {}
        if out is None:
            return self.forward(inputs)
        return ModelOutputs(logits=None, hidden=out.hidden.clone(), head=head,
                            features={k: v.float().clone() for k, v in features.items()})

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs).logits

    def fingerprint(self) -> str:
        """A hash of the weights, buffers and how the teacher is run (keys the teacher-output cache)."""
        h = hashlib.sha256(f"{type(self.model).__name__}|{self.precision}|{self.channels_last}|{self.fused}".encode())
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def check(self, example: torch.Tensor, num_classes: int, where: str = "teacher") -> None:
        """Fail early, with the field named, when the teacher does not fit the data."""
        try:
            out = self.forward(example)
        except RuntimeError as exc:
            raise CompatibilityError(
                f"{where}: cannot take inputs of shape {tuple(example.shape[1:])}: {str(exc).splitlines()[0]}"
            ) from None
        got = out.logits.shape[-1]
        if got != num_classes:
            raise CompatibilityError(f"{where}: outputs {got} classes; the data has {num_classes}")


COMPILE_MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def _compiled(model: nn.Module, mode: str):
    """torch.compile of a frozen model (distill.teacher_compile); compiled lazily, at the first call per shape."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r}; expected off or one of {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=COMPILE_MODES[mode])


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None, log: Log | None = None) -> tuple[nn.Module, bool]:
    """(model with BatchNorm folded, True), or (the model as it is, False) with the reason told through `log`
    (warnings.warn without one). The model passed in is never modified: folding works on a copy, which is used
    only if its outputs on `example` match the model's (FOLD_RTOL relative to the largest output).

    torch.fx only finds the pairs (a BatchNorm whose input is the output of a Conv or Linear layer that nothing else
    reads); the fold itself happens in the copy, module by module (the layer's weights absorb the statistics, the
    BatchNorm becomes an Identity), so the copy keeps the model's own class, forward and module paths: feature taps
    on containers such as a ResNet's `layer3` or a VGG's `features.20` still fire."""
    from torch import fx

    say = log if log is not None else _warn
    where = "distill.teacher_fuse_bn"
    kind = type(model).__name__
    present = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not present:
        say(f"{where}: the teacher ({kind}) has no BatchNorm layer; nothing to fold")
        return model, False
    if example is None:
        say(
            f"{where}: no example inputs to check the folded teacher ({kind}) against; "
            f"its {len(present)} BatchNorm layers are left unfolded"
        )
        return model, False
    model.eval()
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow and other untraceable code
        say(f"{where}: torch.fx cannot trace the teacher ({kind}): {_first_line(exc)}; BatchNorm left unfolded")
        return model, False
    modules = dict(model.named_modules())
    called = [str(n.target) for n in graph.nodes if n.op == "call_module" and _is_bn(modules.get(str(n.target)))]
    pairs = _foldable_pairs(graph, modules)
    if not pairs:
        say(
            f"{where}: no BatchNorm layer of the teacher ({kind}) directly follows a convolution or linear layer "
            f"that can absorb it ({_names(called or present)}); nothing folded"
        )
        return model, False
    import copy

    folded = copy.deepcopy(model).eval()
    try:
        for layer_path, bn_path in pairs:
            _set_module(folded, layer_path, _fold_pair(folded.get_submodule(layer_path), folded.get_submodule(bn_path)))
            _set_module(folded, bn_path, nn.Identity())
    except Exception as exc:
        say(f"{where}: folding BatchNorm into the teacher ({kind}) failed: {_first_line(exc)}; left unfolded")
        return model, False
    difference = _outputs_differ(model, folded, example)
    if difference:
        say(f"{where}: the folded teacher ({kind}) does not give the teacher's outputs ({difference}); left unfolded")
        return model, False
    done = {bn for _, bn in pairs}
    left = [name for name in called if name not in done]
    if left:
        say(
            f"{where}: folded {len(pairs)} of {len(called)} BatchNorm layers of the teacher ({kind}); left as they "
            f"are: {_names(left)} (not directly after a convolution or linear layer whose output only they read, or "
            "without running statistics)"
        )
    elif log is not None:
        log(f"teacher: folded {len(pairs)} BatchNorm layers into the layers before them (outputs checked)")
    return folded, True


# Exact classes, as torch.fx's own fuse pass matches them: a subclass may do more in its forward (timm's
# BatchNormAct2d applies an activation, its Conv2dSame pads), which a fold would drop.
_ABSORBERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_bn(module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _foldable_pairs(graph, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """(layer path, BatchNorm path) for each plain BatchNorm called once, with running statistics, whose only input
    is the output of a Conv/Linear layer called once and read by nothing else (what torch.fx's own fuse pass
    folds)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if type(bn) not in _FOLDABLE_BN or not bn.track_running_stats or bn.running_mean is None or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules.get(str(src.target))
        if type(layer) not in _ABSORBERS or calls[str(src.target)] != 1 or calls[str(node.target)] != 1:
            continue
        if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """The layer with the BatchNorm's affine map and statistics folded into its weights (eval mode)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    return fuse(layer.eval(), bn.eval())


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _outputs_differ(model: nn.Module, fused: nn.Module, example: torch.Tensor) -> str:
    """'' when the folded model's outputs on `example` match the model's; otherwise what differs."""
    try:
        with torch.inference_mode():
            ref, got = model(example), fused(example)
        ref, got = getattr(ref, "logits", ref), getattr(got, "logits", got)
    except Exception as exc:
        return f"it fails on the example inputs: {_first_line(exc)}"
    ref, got = ref.float(), got.float()
    if ref.shape != got.shape:
        return f"output shape {tuple(got.shape)} instead of {tuple(ref.shape)}"
    error, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    if not error <= FOLD_RTOL * scale + FOLD_ATOL:  # `not <=` is also true for NaN
        return f"max abs difference {error:.3g} for outputs up to {scale:.3g}; tolerance {FOLD_RTOL:g} relative"
    return ""


def _names(paths: list[str], n: int = 5) -> str:
    return ", ".join(paths[:n]) + (f", ... ({len(paths)} in all)" if len(paths) > n else "")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)
