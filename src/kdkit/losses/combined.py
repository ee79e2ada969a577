"""The total loss: an explicit weighted sum of named parts."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.losses import token_functional as Ft
from kdkit.losses.base import Loss
from kdkit.losses.fused_head import fused_token_loss, head_logits
from kdkit.types import Batch, ModelOutputs, StepOutput


def log_names(names: list[str]) -> list[str]:
    """How each term is logged: its loss name, or name.<position> when the name occurs more than once.

    ["ce", "hint", "hint"] → ["ce", "hint.1", "hint.2"]: the suffix is the term's position in the list (its index
    in distill.losses), so the label says which config entry a logged value belongs to.
    """
    return [f"{n}.{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class WeightedLoss(nn.Module):
    """total = Σ weight_i · loss_i. Weights are explicit: there is no hidden (1 − α) complement.

    forward() returns every part before weighting in StepOutput.parts under `part_names[i]` (see log_names).
    """

    def __init__(self, terms: list[tuple[float, Loss]]):
        super().__init__()
        if not terms:
            raise ValueError("a WeightedLoss needs at least one term")
        self.weights = [float(w) for w, _ in terms]
        self.parts = nn.ModuleList([loss for _, loss in terms])
        self.part_names = log_names([loss.name for _, loss in terms])
        self.fuse_head = True

    @property
    def needs_teacher(self) -> bool:
        return any(p.needs_teacher and w > 0 for w, p in zip(self.weights, self.parts))

    @property
    def needs_labels(self) -> bool:
        """Some part reads the true label of every example (Loss.needs_labels)."""
        return any(p.needs_labels for p in self.parts)

    def resolve(self, student_model: nn.Module, teacher_models: list[nn.Module]) -> None:
        for p in self.parts:
            p.resolve(student_model, teacher_models)

    def feature_paths(self) -> tuple[list[str], list[str]]:
        """Union of the parts' (student paths, teacher paths), in first-seen order."""
        student, teacher = [], []
        for p in self.parts:
            s, t = p.feature_paths()
            student += [x for x in s if x not in student]
            teacher += [x for x in t if x not in teacher]
        return student, teacher

    def setup(self, student_shapes: dict, teacher_shapes: dict) -> None:
        for p in self.parts:
            p.setup(student_shapes, teacher_shapes)

    def set_epoch(self, epoch: float) -> None:
        """Tell every part the fractional epoch (the engine calls this before every micro-batch)."""
        for p in self.parts:
            p.set_epoch(epoch)

    def formula(self) -> str:
        """E.g. "total = 0.1*ce + 0.9*soft_kl(T=4)"; a repeated loss shows its log label: "0.5*hint(...) [hint.1]"."""
        terms = []
        for w, p, label in zip(self.weights, self.parts, self.part_names):
            terms.append(f"{w:g}*{p.describe()}" + (f" [{label}]" if label != p.name else ""))
        return "total = " + " + ".join(terms)

    @property
    def fuses_head(self) -> bool:
        """Every part that reads the student's logits can take its last hidden state and head instead
        (kdkit.losses.fused_head): the engine then asks a causal LM for those, and the logits never exist whole.
        `fuse_head = False` on this object turns it off."""
        headless = [p for p in self.parts if hasattr(p, "token_term") or p.reads_positions]
        others_read_features = all(hasattr(p, "token_term") or p.reads_positions or not p.reads_logits
                                   for p in self.parts)
        return self.fuse_head and bool(headless) and others_read_features

    @property
    def teacher_at_positions(self) -> bool:
        """Every part that reads the teacher reads its logits at a few positions only (Loss.reads_positions), so a
        causal-LM teacher may give its last hidden state and head instead of its logits (a cross-tokenizer source)."""
        readers = [p for w, p in zip(self.weights, self.parts) if p.needs_teacher and w > 0]
        return self.fuse_head and bool(readers) and all(p.reads_positions for p in readers)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> StepOutput:
        if student.hidden is not None and student.logits is None:
            fused = self._fused(student, teacher, batch)
            if fused is not None:
                return fused
            student = student.with_logits()
        if teacher is not None and any(p.reads_logits and not p.reads_positions for p in self.parts):
            teacher = teacher.with_logits()  # once for every part that reads the whole logits
        total = torch.zeros((), device=student.logits.device)
        parts = {}
        for w, p, label in zip(self.weights, self.parts, self.part_names):
            if teacher is None and p.needs_teacher and w == 0:
                continue  # needs_teacher told the engine it may skip the teacher for a zero-weight part
            value = part_value(p, student, teacher, batch)
            parts[label] = value.detach()
            total = total + w * value
        return StepOutput(loss=total, parts=parts)

    def _fused(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> StepOutput | None:
        """The token parts in one fused pass over the student's hidden state and head (kdkit.losses.fused_head),
        the other parts (which read features, or the logits at a few positions: kdkit.losses.at_positions) as
        usual; None when the parts cannot share that pass (mixed
        shift settings, a padded vocabulary, a teacher of another width), so that forward() falls back to logits."""
        live = [
            (w, p, label)
            for w, p, label in zip(self.weights, self.parts, self.part_names)
            if not (teacher is None and p.needs_teacher and w == 0)
        ]
        token = [(w, p, label) for w, p, label in live if hasattr(p, "token_term")]
        shifts = {p.shift for _, p, _ in token}
        whole = [p for _, p, _ in live if p.reads_logits and not (hasattr(p, "token_term") or p.reads_positions)]
        if len(shifts) > 1 or whole:
            return None
        total, parts = torch.zeros((), device=student.hidden.device), {}
        if token:
            vocab = student.head.weight.shape[0]
            if teacher is not None and any(p.needs_teacher for _, p, _ in token) and _width(teacher) not in (None,
                                                                                                             vocab):
                return None  # another vocabulary: the logits path names the mismatch
            b, t = student.hidden.shape[:2]
            rows, cols = Ft.real_positions(batch.labels, b, t, shifts.pop(), device=student.hidden.device)
            terms = [p.token_term(teacher, batch, rows.numel(), w, vocab) for w, p, _ in token]
            if any(term is None for term in terms):
                return None
            chunk = min((p.chunk_size for _, p, _ in token if getattr(p, "chunk_size", None)), default=None)
            teacher_chunk = _teacher_chunk(teacher) if any(term.reads_teacher for term in terms) else None
            total, values = fused_token_loss(student.hidden, student.head, rows, cols, terms, teacher_chunk, chunk)
            parts = {label: v for (_, _, label), v in zip(token, values)}
        for w, p, label in live:
            if not hasattr(p, "token_term"):
                value = part_value(p, student, teacher, batch)
                parts[label] = value.detach()
                total = total + w * value
        return StepOutput(loss=total, parts={label: parts[label] for _, _, label in live})


def part_value(part: Loss, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> torch.Tensor:
    """A part's value. Against several teachers with tokenizers of their own (teacher.groups, kdkit.run.
    teacher_groups), a part that reads the teacher is the weighted sum of its value against each group."""
    if teacher is not None and teacher.groups and part.needs_teacher:
        return sum(w * part(student, _view(part, group), batch) for w, group in teacher.groups)
    return part(student, _view(part, teacher), batch)


def _view(part: Loss, teacher: ModelOutputs | None) -> ModelOutputs | None:
    """The teacher outputs as the part reads them: with whole logits (ModelOutputs.with_logits) for a part that reads
    them, as they came for one that reads features or the logits at a few positions (Loss.reads_positions)."""
    if teacher is None or not part.reads_logits or part.reads_positions:
        return teacher
    return teacher.with_logits()


def _width(outputs: ModelOutputs) -> int | None:
    """The number of logits a dense model output has (None for a sparse one)."""
    if outputs.head is not None:
        return outputs.head.weight.shape[0]
    return None if outputs.logits is None else outputs.logits.shape[-1]


def _teacher_chunk(teacher: ModelOutputs):
    """(r, c) → the dense teacher's logits at those positions: from its hidden state and head (no (B, T, V)
    tensor), or read from its logits."""
    if teacher.hidden is not None and teacher.logits is None:
        h, w, b = teacher.hidden, teacher.head.weight, getattr(teacher.head, "bias", None)
        return lambda r, c: head_logits(h[r, c], w, b)
    logits = teacher.logits.detach()
    return lambda r, c: logits[r, c]
