"""The student of a causal-LM run, built the same way for every seed.

From the teacher (member 0): its own `teacher_layers` (depth, DistilBERT-style), then optionally `prune` (width:
MLP channels, KV heads, hidden channels kept by activation importance on training text, Minitron). Or a random-init
config of the teacher's family changed by `kwargs` (pretrained: false), or the model at `path`. A student with its
own vocabulary (a teacher with another tokenizer, read through the cross-tokenizer losses) is a random-init config
of the teacher's family sized to the data's tokenizer (its vocabulary and special ids), or the model at `path`; the
teacher's layers come with the teacher's vocabulary, so teacher_layers and prune are refused there. The importance is
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
from kdkit.errors import ConfigError
from kdkit.models.causal_lm import load_causal_lm, smaller_lm, smaller_lm_config, student_from_teacher_lm
from kdkit.teachers import TeacherEnsemble

CALIBRATION_BATCH = 8


class LMStudents:
    """`students(seed)`: a fresh, trainable student; the pruning importance is measured on the first call."""

    def __init__(self, cfg: KDConfig, teacher: TeacherEnsemble, data: LMBundle,
                 log: Callable[[str], None] | None = None, own_vocabulary: bool = False):
        self.cfg, self.teacher, self.data, self.log = cfg, teacher, data, log
        self.own_vocabulary = own_vocabulary
        self.importance = None
        s = cfg.student.model
        if own_vocabulary and (s.teacher_layers is not None or s.prune is not None):
            field = "teacher_layers" if s.teacher_layers is not None else "prune"
            raise ConfigError(
                f"student.model.{field}: the teacher's layers come with its vocabulary, and this student has its own "
                "tokenizer (data.tokenizer); expected pretrained: false with kwargs, or a folder (path)"
            )

    def __call__(self, seed: int) -> nn.Module:
        s = self.cfg.student.model
        torch.manual_seed(seed)
        base = self.teacher.members[0].model
        if s.teacher_layers is not None:
            model = student_from_teacher_lm(base, s.teacher_layers, "student.model.teacher_layers")
        elif s.prune is not None:
            model = base  # prune_lm slices into a new model; the teacher is only read
        elif not s.pretrained and self.own_vocabulary:
            model = own_vocabulary_lm(base, self.data.tokenizer, s.kwargs, "student.model.kwargs")
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


def own_vocabulary_lm(teacher: nn.Module, tokenizer, kwargs: dict, where: str) -> nn.Module:
    """A random-init causal LM of the teacher's family shaped by `kwargs` (smaller_lm_config), with the vocabulary
    of `tokenizer`: vocab_size its length (kwargs may set more, a padded output layer), bos/eos/pad its ids."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    vocab = int(kwargs.pop("vocab_size", len(tokenizer)))
    if vocab < len(tokenizer):
        raise ConfigError(f"{where}.vocab_size: {vocab}; the student's tokenizer has {len(tokenizer)} tokens "
                          "(expected at least that)")
    config = smaller_lm_config(teacher, where, **kwargs)
    config.vocab_size = vocab
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    config.bos_token_id, config.eos_token_id, config.pad_token_id = bos, eos, pad
    return AutoModelForCausalLM.from_config(config)


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
