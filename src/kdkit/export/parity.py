"""Parity: an exported model must compute what the eager PyTorch student computes, on held-out inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kdkit.errors import KdkitError

FP32_TOLERANCE = 1e-4  # max |exported logit − eager logit| accepted for an fp32 export


class ParityError(KdkitError):
    """An exported model's outputs differ from the eager student's by more than the tolerance."""


@dataclass
class Parity:
    """max_abs_diff: the largest |exported − eager| over all logits of all `n` inputs; label_agreement: the share
    of inputs whose arg-max class is the same."""

    max_abs_diff: float
    label_agreement: float
    n: int
    tolerance: float = FP32_TOLERANCE

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


@torch.inference_mode()
def eager_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    out = model(x)
    return getattr(out, "logits", out).float().cpu().numpy()


def compare(reference: np.ndarray, exported: np.ndarray, tolerance: float = FP32_TOLERANCE) -> Parity:
    if reference.shape != exported.shape:
        raise ParityError(f"export: the exported model returns shape {exported.shape}; eager gives {reference.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - exported.astype(np.float64)))) if reference.size else 0.0
    agree = float(np.mean(reference.argmax(-1) == exported.argmax(-1))) if len(reference) else 1.0
    return Parity(diff, agree, int(len(reference)), tolerance)


def check_parity(
    model: nn.Module,
    exported: Callable[[torch.Tensor], np.ndarray],
    x: torch.Tensor,
    fmt: str,
    tolerance: float = FP32_TOLERANCE,
) -> Parity:
    """Run `x` through the eager model and the exported one (in one batch, and a single example, so that a batch
    size baked into the export shows up); raise ParityError above `tolerance`."""
    reference = eager_logits(model, x)
    got = exported(x)
    parity = compare(reference, got, tolerance)
    if len(x) > 1:
        single = compare(reference[:1], exported(x[:1]), tolerance)
        parity.max_abs_diff = max(parity.max_abs_diff, single.max_abs_diff)
    if not parity.ok:
        raise ParityError(
            f"export --format {fmt}: max abs diff {parity.max_abs_diff:.3g} against eager PyTorch on {parity.n} "
            f"held-out inputs; expected ≤ {tolerance:g} (nothing was written)"
        )
    return parity
