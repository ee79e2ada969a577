"""A causal language model's last hidden state and output head, instead of its (B, T, V) logits.

The fused token losses (kdkit.losses.fused_head) apply the head themselves, chunk by chunk. The model is still
called through its own forward (so that DDP's hooks and Accelerate's wrappers run as usual), asking it for its hidden
states and for the logits of the last position only (Hugging Face's `logits_to_keep=1`); those kept logits are
compared once per model with the head applied to the last hidden state, so that a family whose logits are more than
`hidden @ Wᵀ + b` (soft-capping, a logit scale) is noticed and run the ordinary way.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from kdkit.types import ModelOutputs

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → its head reproduced its kept logits


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP and similar wrappers keep the model in .module


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The output layer to apply outside the model, or None when the model must give its logits itself.

    Yes for a transformers causal LM whose forward takes logits_to_keep and output_hidden_states and whose head is
    a plain nn.Linear (tied to the embeddings or not). No for anything else, for a model sharded by FSDP2 (its head
    weight is a shard outside the forward), and for a model that failed the first call's check.
    """
    inner = _inner(model)
    if _CHECKED.get(inner) is False or not hasattr(inner, "get_output_embeddings"):
        return None
    try:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(inner, FSDPModule):
            return None
    except ImportError:  # pragma: no cover - torch without FSDP2
        pass
    params = inspect.signature(inner.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "logits_to_keep" not in params or not ("output_hidden_states" in params or takes_kwargs):
        return None
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if type(head) is not nn.Linear or getattr(config, "final_logit_softcapping", None):
        return None
    return head


def hidden_outputs(model: nn.Module, inputs: torch.Tensor, head: nn.Linear) -> ModelOutputs | None:
    """ModelOutputs(hidden=last hidden state (B, T, H), head=head) from one call of the model, or None when the
    head did not reproduce the model's own last-position logits (checked on the first call; the model is then
    remembered as not fusable and the caller runs it the ordinary way)."""
    out = model(inputs, logits_to_keep=1, output_hidden_states=True)
    inner = _inner(model)
    if not getattr(out, "hidden_states", None):
        _CHECKED[inner] = False
        return None
    hidden = out.hidden_states[-1]
    if inner not in _CHECKED:
        with torch.no_grad():
            mine = head(hidden[:, -1:]).float()
            theirs = out.logits[:, -1:].float()
            scale = theirs.abs().max().clamp_min(1.0)
            _CHECKED[inner] = bool(mine.shape == theirs.shape and (mine - theirs).abs().max() <= 1e-3 * scale)
        if not _CHECKED[inner]:
            return None
    return ModelOutputs(logits=None, hidden=hidden, head=head)
