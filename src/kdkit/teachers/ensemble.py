"""An ensemble of teachers that looks like one teacher: the same ModelOutputs, so losses do not care."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.teachers.teacher import Teacher
from kdkit.types import ModelOutputs


class TeacherEnsemble(nn.Module):
    """Weighted average of members.

    combine="probs": p = Σ w_i softmax(z_i); the returned logits are log p (softmax(log p) = p, so a loss at T=1
    sees exactly the averaged probabilities; at T ≠ 1 it softens the averaged distribution).
    combine="logits": z = Σ w_i z_i. Weights are normalised to sum to 1.

    inputs_for: per member, None (the member takes the ensemble's inputs) or a function that maps the ensemble's
    inputs to the member's own, e.g. a kdkit.data.text.Retokenizer for a text teacher with another tokenizer:
    the ensemble is fed the student's token ids and each member sees the same texts in its own ids.
    """

    def __init__(
        self,
        members: list[Teacher],
        weights: list[float] | None = None,
        combine: str = "probs",
        feature_member: int | None = None,
        inputs_for: list | None = None,
    ):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one teacher")
        if combine not in ("probs", "logits"):
            raise ValueError(f"combine={combine!r}; expected 'probs' or 'logits'")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or any(w <= 0 for w in weights):
            raise ValueError(f"weights={weights}; expected {len(members)} positive numbers")
        total = sum(weights)
        self.members = nn.ModuleList(members)
        self.weights = [w / total for w in weights]
        self.combine = combine
        if feature_member is not None and not 0 <= feature_member < len(members):
            raise ValueError(f"feature_member={feature_member}; expected 0..{len(members) - 1} or null")
        self.feature_member = feature_member
        self.inputs_for = list(inputs_for) if inputs_for is not None else [None] * len(members)
        if len(self.inputs_for) != len(members):
            raise ValueError(f"inputs_for has {len(self.inputs_for)} entries; expected one per member ({len(members)})")

    def tap(self, paths: list[str], where: str = "teacher") -> None:
        """Features for feature losses: from one chosen member, or the weighted mean over members (each member
        must then have every path, with the same shapes)."""
        for i, m in enumerate(self.members):
            if self.feature_member is None or i == self.feature_member:
                m.tap(paths, f"{where}.members.{i}.model")

    def train(self, mode: bool = True) -> TeacherEnsemble:
        return super().train(False)

    def forward(self, inputs: torch.Tensor) -> ModelOutputs:
        results = [m(self.member_inputs(i, inputs)) for i, m in enumerate(self.members)]
        outs = [r.logits for r in results]  # each (B, C) fp32
        classes = {o.shape[-1] for o in outs}
        if len(classes) > 1:
            raise CompatibilityError(f"teacher.members: members output different class counts {sorted(classes)}")
        if self.combine == "logits":
            logits = sum(w * o for w, o in zip(self.weights, outs))
        else:
            # log Σ w_i softmax(z_i), computed stably in log space.
            stacked = torch.stack([o.log_softmax(-1) + torch.log(torch.tensor(w)) for w, o in zip(self.weights, outs)])
            logits = torch.logsumexp(stacked, dim=0)
        return ModelOutputs(logits=logits, features=self._features(results))

    def hidden_forward(self, inputs: torch.Tensor) -> ModelOutputs:
        """A single member fed the ensemble's inputs gives its hidden state and head (Teacher.hidden_forward: the
        same distribution as forward(), whose log-probabilities differ from its logits by a constant per row);
        several members are averaged over whole logits by forward()."""
        if len(self.members) == 1 and self.inputs_for[0] is None and hasattr(self.members[0], "hidden_forward"):
            return self.members[0].hidden_forward(inputs)
        return self.forward(inputs)

    def member_inputs(self, i: int, inputs: torch.Tensor) -> torch.Tensor:
        """What member i is fed for the ensemble's `inputs`."""
        convert = self.inputs_for[i]
        return inputs if convert is None else convert(inputs)

    def _features(self, results: list[ModelOutputs]) -> dict[str, torch.Tensor]:
        if self.feature_member is not None:
            return results[self.feature_member].features
        if not results[0].features:
            return {}
        merged = {}
        for path in results[0].features:
            shapes = {tuple(r.features[path].shape) for r in results}
            if len(shapes) > 1:
                raise CompatibilityError(
                    f"teacher.members: feature {path!r} has shapes {sorted(shapes)} across members; averaging needs "
                    "one shape: set teacher.feature_member to take features from one member"
                )
            merged[path] = sum(w * r.features[path] for w, r in zip(self.weights, results))
        return merged

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(inputs).logits

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"ensemble|{self.combine}|{self.weights}".encode())
        for m, convert in zip(self.members, self.inputs_for):
            h.update(m.fingerprint().encode())
            if convert is not None:  # the member's outputs also depend on how its inputs are made
                h.update(getattr(convert, "fingerprint", lambda c=convert: repr(c))().encode())
        return h.hexdigest()

    def check(self, example: torch.Tensor, num_classes: int, where: str = "teacher") -> None:
        for i, m in enumerate(self.members):
            m.check(self.member_inputs(i, example), num_classes, f"{where}.members.{i}")
