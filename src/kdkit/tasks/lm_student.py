"""The student of a causal-LM run, built the same way for every seed.

From the teacher (member 0): its own `teacher_layers` (depth, DistilBERT-style), then optionally `prune` (width:
MLP channels, KV heads, hidden channels kept by activation importance on training text, Minitron). Or a random-init
config of the teacher's family changed by `kwargs` (pretrained: false), or the model at `path`. The importance is
measured once, on the first `calibration_blocks` training blocks, and reused for every seed: it depends on the
teacher and the text only, so every seed starts from the same pruned weights (as every seed starts from the same
teacher layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdkit.config import KDConfig
from kdkit.data.lm import LMBundle
from kdkit.models.causal_lm import load_causal_lm, smaller_lm, student_from_teacher_lm
from kdkit.teachers import TeacherEnsemble

CALIBRATION_BATCH = 8


class LMStudents:
    """`students(seed)`: a fresh, trainable student; the pruning importance is measured on the first call."""

    def __init__(self, cfg: KDConfig, teacher: TeacherEnsemble, data: LMBundle,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.teacher, self.data, self.log = cfg, teacher, data, log
        self.importance = None

    def __call__(self, seed: int) -> nn.Module:
        s = self.cfg.student.model
        torch.manual_seed(seed)
        base = self.teacher.members[0].model
        if s.teacher_layers is not None:
            model = student_from_teacher_lm(base, s.teacher_layers, "student.model.teacher_layers")
        elif s.prune is not None:
            model = base  # prune_lm slices into a new model; the teacher is only read
        elif not s.pretrained:
            model = smaller_lm(base, where="student.model.kwargs", **s.kwargs)
        else:
            model, _ = load_causal_lm(s.path, "student.model.path")
        if s.prune is not None:
            model = self._pruned(model)
        for p in model.parameters():  # a copy of the frozen teacher's layers must learn
            p.requires_grad_(True)
        return model.train()

    def _pruned(self, model: nn.Module) -> nn.Module:
        from kdkit.models.prune_lm import lm_importance, prune_lm

        spec, where = self.cfg.student.model.prune, "student.model.prune"
        if self.importance is None:
            self.importance = lm_importance(model, calibration_batches(self.data, spec.calibration_blocks), where)
        pruned = prune_lm(model, self.importance, intermediate_size=spec.intermediate_size,
                          num_key_value_heads=spec.num_key_value_heads, hidden_size=spec.hidden_size, where=where)
        if self.log is not None:
            before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
            self.log(f"pruned student: {before / 1e6:.2f} M → {after / 1e6:.2f} M parameters (importance on "
                     f"{self.importance.tokens} training tokens)")
        return pruned


def calibration_batches(data: LMBundle, blocks: int) -> list[dict[str, torch.Tensor]]:
    """The first `blocks` training blocks as batches of input_ids and attention_mask (1: real token)."""
    train = data.train
    n = min(blocks, len(train))
    out = []
    for start in range(0, n, CALIBRATION_BATCH):
        ids = train.ids[start:min(start + CALIBRATION_BATCH, n)]
        lengths = train.lengths[start:min(start + CALIBRATION_BATCH, n)]
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        out.append({"input_ids": ids, "attention_mask": mask.long()})
    return out
