"""Losses: the math in `functional.py`, one thin module per loss, and the LOSSES registry.

Adding a loss: its file, one line in LOSSES, its test. build_loss, `kdkit validate` (kdkit.validate.check_names)
and the config reference (kdkit.validate.config_docs) read LOSSES; nothing else lists loss names. What a loss needs
is a class attribute: needs_teacher, needs_labels (see Loss); cross_tokenizer (uld, hybrid_kl, span_likelihood):
the loss reads a teacher with another tokenizer through the alignment its outputs carry (kdkit.run.cross_teacher).
"""

from __future__ import annotations

from collections.abc import Callable

from kdkit.errors import ConfigError
from kdkit.losses.attention_map import AttentionMap
from kdkit.losses.attention_transfer import AttentionTransfer
from kdkit.losses.base import Loss, ParamError
from kdkit.losses.ce import CrossEntropy
from kdkit.losses.combined import WeightedLoss
from kdkit.losses.dkd import DecoupledKD
from kdkit.losses.hard_teacher import HardTeacher
from kdkit.losses.hidden_state import HiddenState
from kdkit.losses.hint import Hint
from kdkit.losses.hybrid_kl import HybridKL
from kdkit.losses.mutual import MutualLearning
from kdkit.losses.soft_kl import SoftKL
from kdkit.losses.span_likelihood import SpanLikelihood
from kdkit.losses.token_ce import TokenCE
from kdkit.losses.token_kl import TokenKL
from kdkit.losses.uld import ULD
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
    "uld": ULD,
    "hybrid_kl": HybridKL,
    "span_likelihood": SpanLikelihood,
}


def build_loss(terms: list[tuple[str, float, dict]], where: str = "distill.losses") -> WeightedLoss:
    """[(name, weight, params)] -> WeightedLoss; unknown names, parameters and bad values fail with the field path."""
    return WeightedLoss(
        [(weight, make_loss(name, params, f"{where}.{i}")) for i, (name, weight, params) in enumerate(terms)]
    )


def make_loss(name: str, params: dict, where: str) -> Loss:
    """One loss from its registered name and parameters; a ConfigError names the field under `where`
    (e.g. "distill.losses.1"): .name for an unknown name, .params.<key> for an unknown key or a bad value."""
    cls = lookup(LOSSES, name, f"{where}.name")
    return construct(cls, bind(cls.__init__, params, f"{where}.params"), f"{where}.params")


def construct(cls: type[Loss], kwargs: dict, where: str, when: Callable[[str], str] | None = None) -> Loss:
    """cls(**kwargs), its constructor's checks turned into a ConfigError naming the field:
    "<where>.temperature: temperature=0; expected a number > 0". when(param) may say when the value is reached
    ("at the end of its linear schedule"), for the parameter that failed. A ValueError or TypeError without a
    parameter name names <where> itself."""
    try:
        return cls(**kwargs)
    except ParamError as exc:
        context = when(exc.param) if when is not None else ""
        raise ConfigError(f"{where}.{exc.param}: {context + ', ' if context else ''}{exc}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


__all__ = [
    "LOSSES",
    "Loss",
    "WeightedLoss",
    "build_loss",
    "make_loss",
    "construct",
    "ParamError",
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
    "ULD",
    "HybridKL",
    "SpanLikelihood",
]
