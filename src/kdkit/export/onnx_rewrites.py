"""Rewrites that let torch's ONNX exporter take real networks it would refuse, each exact, applied to a copy of the
student just before export (the parity check then compares the ONNX model with the unrewritten student).

    exportable = onnx_exportable(student, x)   # the student itself when nothing needs rewriting

AdaptiveAvgPool2d that up-samples: torchvision's VGG ends its features with AdaptiveAvgPool2d((7, 7)); on 32×32
images the features are 1×1, and the TorchScript exporter refuses adaptive pooling whose output size is not a factor
of its input size. When each output size is a whole multiple of the input size, every output bin averages exactly
one input pixel, so the layer equals nearest-neighbour up-sampling by that factor, which ONNX's Resize expresses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def onnx_exportable(student: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of `student` with every up-sampling AdaptiveAvgPool2d (seen on inputs `x`) made an nn.Upsample; the
    student itself when there is none."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(path: str):
        def hook(module, args) -> None:  # returns None: the inputs pass unchanged
            sizes.setdefault(path, tuple(args[0].shape[-2:]))

        return hook

    hooks = [
        module.register_forward_pre_hook(record(path))
        for path, module in student.named_modules()
        if isinstance(module, nn.AdaptiveAvgPool2d)
    ]
    try:
        with torch.no_grad():
            student(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    factors = {}
    for path, (height, width) in sizes.items():
        out = _pair(student.get_submodule(path).output_size, (height, width))
        if (out[0], out[1]) != (height, width) and out[0] % height == 0 and out[1] % width == 0:
            factors[path] = (out[0] // height, out[1] // width)
    if not factors:
        return student
    rewritten = copy.deepcopy(student)
    for path, factor in factors.items():
        parent, _, attr = path.rpartition(".")
        up = nn.Upsample(scale_factor=(float(factor[0]), float(factor[1])), mode="nearest")
        setattr(rewritten.get_submodule(parent) if parent else rewritten, attr, up)
    return rewritten.eval()


def _pair(output_size, input_size: tuple[int, int]) -> tuple[int, int]:
    """AdaptiveAvgPool2d's output_size as two ints (an int for both; None keeps that input size)."""
    if isinstance(output_size, int):
        return output_size, output_size
    return tuple(int(o) if o is not None else i for o, i in zip(output_size, input_size))
