"""Deep mutual learning (Zhang et al. 2018): peers trained together, each from the labels and the others."""

from __future__ import annotations

import re

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.base import Loss, choice, non_negative, positive
from kdkit.types import Batch, ModelOutputs

PEER_KEY = re.compile(r"peer\d+")


class MutualLearning(Loss):
    """Fk.mutual_learning over every peer's logits, read from ModelOutputs.features["peer<i>"]
    (kdkit.models.peers.Peers).

    peer_target: "pairwise" (the paper's eq. 10: each peer's KL to every other peer, averaged) or "mean_of_peers"
    (one KL to the mean distribution of the other peers); the two agree for two peers.
    Mixup/CutMix mixed labels (batch.mixed_labels, batch.mix_lambda) mix each peer's cross-entropy.
    """

    name = "mutual"
    needs_teacher = False
    needs_labels = True  # every peer trains on the true labels; unlabelled examples need a fixed teacher

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, peer_target: str = "pairwise"):
        super().__init__()
        self.temperature = positive("temperature", temperature)
        self.kd_weight = non_negative("kd_weight", kd_weight)
        self.peer_target = choice("peer_target", peer_target, Fk.PEER_TARGETS)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
        # "peer<i>" exactly (a tapped module path such as "peers.0.fc" is not a peer), in the order Peers built them.
        keys = sorted((k for k in student.features if PEER_KEY.fullmatch(k)), key=lambda k: int(k[4:]))
        peers = [student.features[k] for k in keys]
        if len(peers) < 2:
            raise CompatibilityError("mutual: the model is not a set of peers (kdkit.models.peers.Peers)")
        return Fk.mutual_learning(
            peers,
            batch.labels,
            self.temperature,
            self.kd_weight,
            self.peer_target,
            batch.mixed_labels,
            batch.mix_lambda,
        )

    def describe(self) -> str:
        target = "" if self.peer_target == "pairwise" else ", mean_of_peers"
        return f"mutual(T={self.temperature:g}, kd_weight={self.kd_weight:g}{target})"
