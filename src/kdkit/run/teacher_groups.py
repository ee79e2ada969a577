"""Several teachers across tokenizers: the members grouped by tokenizer, one aligned teacher per group.

Under the cross-tokenizer losses, teacher.members may mix tokenizers. Members whose tokenizers are one tokenizer
(the same definition, kdkit.run.cross_teacher.tokenizer_fingerprint) form a group, the groups in the order of their
first member (members.0's group first). A group's members are averaged as any ensemble (a TeacherEnsemble over their
weights and teacher.combine), so members that share the student's vocabulary are averaged exactly as a
same-tokenizer ensemble and read the student's own ids (hybrid_kl is then token_kl exactly). Each group is read
through its own source (CrossTeacher, or CachedCrossTeacher from its own cache), with its own shared-vocabulary map
for hybrid_kl (AlignedBatch.vocab_map). GroupedTeacher calls every group's source and returns their outputs with
each group's weight, its members' share of all the members' weight (ModelOutputs.groups); the loss takes each
teacher term as the weighted sum of the term against each group (kdkit.losses.combined). With one group there is
nothing to combine: the group's source is the teacher source itself, as for a single teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kdkit.run.cross_teacher import tokenizer_fingerprint
from kdkit.teachers import Teacher, TeacherEnsemble
from kdkit.types import Batch, ModelOutputs


@dataclass
class TeacherGroup:
    """Members that share one tokenizer: their indices in teacher.members, that tokenizer, their ensemble and the
    group's weight (its members' share of all the members' weight)."""

    members: list[int]
    tokenizer: Any
    ensemble: TeacherEnsemble
    weight: float

    @property
    def where(self) -> str:
        """How messages name the group: its first member (teacher.members.N)."""
        return f"teacher.members.{self.members[0]}"


def teacher_groups(members: Sequence[Teacher], weights: Sequence[float], tokenizers: Sequence[Any],
                   combine: str = "probs", whole: TeacherEnsemble | None = None) -> list[TeacherGroup]:
    """The members grouped by tokenizer (module docstring). whole: the ensemble of every member, used as the only
    group's ensemble when all share one tokenizer (the same object, so nothing about a one-tokenizer run changes)."""
    keys = [tokenizer_fingerprint(t) for t in tokenizers]
    order = list(dict.fromkeys(keys))
    total = float(sum(weights))
    groups = []
    for key in order:
        idx = [i for i, k in enumerate(keys) if k == key]
        if len(order) == 1 and whole is not None:
            ensemble = whole
        else:
            ensemble = TeacherEnsemble([members[i] for i in idx], [weights[i] for i in idx], combine)
        groups.append(TeacherGroup(idx, tokenizers[idx[0]], ensemble, sum(weights[i] for i in idx) / total))
    return groups


class GroupedTeacher:
    """The teacher source of several groups: ModelOutputs(logits=None, groups=[(weight, the group's outputs), ...])
    from each group's own source (module docstring)."""

    def __init__(self, sources: Sequence[Callable[[Batch], ModelOutputs]], weights: Sequence[float]):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources for {len(weights)} weights; expected one weight per source")
        self.sources, self.weights = list(sources), [float(w) for w in weights]

    def __call__(self, batch: Batch) -> ModelOutputs:
        return ModelOutputs(logits=None, groups=[(w, source(batch)) for w, source in zip(self.weights, self.sources)])


def one_source(sources: Sequence[Callable[[Batch], ModelOutputs]], weights: Sequence[float]):
    """The teacher source of the groups' sources: the only one as it is, else a GroupedTeacher."""
    return sources[0] if len(sources) == 1 else GroupedTeacher(sources, weights)
