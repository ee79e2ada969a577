"""Logits of a model over a data set, in eval mode, without gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from kdkit.data import collate


@torch.inference_mode()
def predict(
    forward: Callable[[torch.Tensor], object],
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) fp32 on CPU, labels (N,)) in data-set order. `forward` is a model or a teacher."""
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=getattr(dataset, "collate", collate))
    outs, labels = [], []
    for batch in loader:
        out = forward(batch.inputs.to(device))
        outs.append(getattr(out, "logits", out).float().cpu())
        labels.append(batch.labels)
    return torch.cat(outs), torch.cat(labels)
