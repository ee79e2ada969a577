"""Several networks trained together (deep mutual learning): one module whose forward runs every peer.

The first peer is the student; ModelOutputs.logits are its logits, and every peer's logits are in
ModelOutputs.features["peer<i>"] for the mutual loss. One optimizer then updates all peers; since each peer's
loss treats the other peers' predictions as constants, that equals updating each peer on its own loss.
"""

from __future__ import annotations

import torch
from torch import nn

from kdkit.types import ModelOutputs


class Peers(nn.Module):
    def __init__(self, models: list[nn.Module]):
        super().__init__()
        if len(models) < 2:
            raise ValueError("mutual learning needs at least two peers")
        self.peers = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> ModelOutputs:
        outs = [getattr(o, "logits", o) for o in (p(x) for p in self.peers)]
        return ModelOutputs(logits=outs[0], features={f"peer{i}": o for i, o in enumerate(outs)})
