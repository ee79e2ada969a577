"""A frozen teacher: always in eval mode, under inference_mode, never wrapped by DDP, outputs in fp32."""

from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.types import ModelOutputs


class Teacher(nn.Module):
    """Wraps a trained network so that it can only be used for inference.

    precision: "fp32" or "bf16" autocast for the forward pass (outputs are returned in fp32).
    channels_last: store conv weights and run inputs in channels-last memory format (faster convolutions on CPU).
    fuse_bn: fold each BatchNorm into the convolution before it (torch.fx), which a frozen teacher allows: the same
    outputs to float rounding, one pass over the activations less. A model that cannot be traced is kept as it
    is (`self.fused` says which); feature taps then address the fused graph's module paths.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", channels_last: bool = False, fuse_bn: bool = False):
        super().__init__()
        self.fused = False
        if fuse_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            from torch.fx.experimental.optimization import fuse

            try:
                model = fuse(model.eval())
                self.fused = True
            except Exception:  # not symbolically traceable (data-dependent control flow): keep the model as is
                pass
        self.model = model
        self.taps = None
        self.precision = precision
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

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
                out = self.model(inputs)
            logits = getattr(out, "logits", out).float()
            features = self.taps.collect() if self.taps is not None else {}
        # Features leave inference mode as ordinary tensors (a clone), so that losses may save them for backward.
        return ModelOutputs(logits=logits, features={k: v.float().clone() for k, v in features.items()})

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
