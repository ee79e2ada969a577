"""Deep mutual learning (Zhang et al. 2018): peers trained together, each from the labels and the others."""

from __future__ import annotations

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss
from kdkit.types import Batch, ModelOutputs


class MutualLearning(Loss):
    """Reads every peer's logits from ModelOutputs.features["peer<i>"] (kdkit.models.peers.Peers)."""

    name = "mutual"
    needs_teacher = False

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0):
        super().__init__()
        if temperature <= 0 or kd_weight < 0:
            raise ValueError(f"temperature={temperature}, kd_weight={kd_weight}; expected T > 0, kd_weight >= 0")
        self.temperature, self.kd_weight = float(temperature), float(kd_weight)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        peers = [student.features[k] for k in sorted(student.features) if k.startswith("peer")]
        if len(peers) < 2:
            raise CompatibilityError("mutual: the model is not a set of peers (kdkit.models.peers.Peers)")
        return Fk.mutual_learning(peers, batch.labels, self.temperature, self.kd_weight)

    def describe(self) -> str:
        return f"mutual(T={self.temperature:g}, kd_weight={self.kd_weight:g})"
