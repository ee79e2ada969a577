"""Losses: the math in `functional.py`, one thin module per loss, and the LOSSES registry.

Adding a loss: its file, one line in LOSSES, its test.
"""

from __future__ import annotations

from kdkit.losses.attention_map import AttentionMap
from kdkit.losses.attention_transfer import AttentionTransfer
from kdkit.losses.base import Loss
from kdkit.losses.ce import CrossEntropy
from kdkit.losses.combined import WeightedLoss
from kdkit.losses.dkd import DecoupledKD
from kdkit.losses.hard_teacher import HardTeacher
from kdkit.losses.hidden_state import HiddenState
from kdkit.losses.hint import Hint
from kdkit.losses.mutual import MutualLearning
from kdkit.losses.soft_kl import SoftKL
from kdkit.losses.token_ce import TokenCE
from kdkit.losses.token_kl import TokenKL
from kdkit.registry import bind, lookup

LOSSES: dict[str, type[Loss]] = {
    "ce": CrossEntropy,
    "soft_kl": SoftKL,
    "hard_teacher": HardTeacher,
    "dkd": DecoupledKD,
    "hint": Hint,
    "attention_transfer": AttentionTransfer,
    "hidden_state": HiddenState,
    "attention_map": AttentionMap,
    "mutual": MutualLearning,
    "token_kl": TokenKL,
    "token_ce": TokenCE,
}


def build_loss(terms: list[tuple[str, float, dict]], where: str = "distill.losses") -> WeightedLoss:
    """[(name, weight, params)] -> WeightedLoss; unknown names and parameters fail with the field path."""
    built = []
    for i, (name, weight, params) in enumerate(terms):
        cls = lookup(LOSSES, name, f"{where}.{i}.name")
        kwargs = bind(cls.__init__, params, f"{where}.{i}.params")
        try:
            built.append((weight, cls(**kwargs)))
        except ValueError as exc:
            from kdkit.errors import ConfigError

            raise ConfigError(f"{where}.{i}.params: {exc}") from None
    return WeightedLoss(built)


__all__ = [
    "LOSSES",
    "Loss",
    "WeightedLoss",
    "build_loss",
    "CrossEntropy",
    "SoftKL",
    "HardTeacher",
    "DecoupledKD",
    "Hint",
    "AttentionTransfer",
    "HiddenState",
    "AttentionMap",
    "TokenKL",
    "TokenCE",
]
