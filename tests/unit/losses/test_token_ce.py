"""token_ce: the causal-LM loss, by hand and against torch's reference, with the shift, masking and normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdkit.losses import build_loss
from kdkit.losses.token_ce import token_cross_entropy
from kdkit.types import Batch, ModelOutputs


def test_hand_computed_two_positions():
    # V = 2; logits at t=0 predict labels[1] = 1, at t=1 predict labels[2] = 0; t=2 predicts nothing.
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[7, 1, 0]])  # labels[0] is never a target
    # p(1 | t=0) = 3/4, p(0 | t=1) = 3/4 → mean −log(3/4)
    expected = -math.log(0.75)
    assert math.isclose(token_cross_entropy(logits, labels).item(), expected, rel_tol=1e-6)


def test_equals_hf_style_shifted_cross_entropy_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 4:] = -100
    labels[2, 0] = -100  # the first label is never a target anyway
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(token_cross_entropy(logits, labels), ref, atol=1e-6)


def test_masked_positions_are_never_read():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3:] = -100  # positions 2, 3 of row 0 predict nothing; position 4 never does
    clean = token_cross_entropy(logits, labels)
    dirty = logits.clone()
    dirty[0, 2:] = float("nan")
    dirty[:, -1] = float("inf")
    assert torch.allclose(token_cross_entropy(dirty, labels), clean)


def test_global_count_normalisation_adds_up_over_micro_batches():
    torch.manual_seed(2)
    logits = torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[0, 2:] = -100
    labels[3, 5:] = -100
    whole = token_cross_entropy(logits, labels)
    n = (labels[:, 1:] != -100).sum()
    parts = token_cross_entropy(logits[:2], labels[:2], n) + token_cross_entropy(logits[2:], labels[2:], n)
    assert torch.allclose(parts, whole, atol=1e-6)


def test_fp32_for_half_logits_and_zero_without_targets():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 5).to(torch.bfloat16)
    labels = torch.randint(0, 5, (2, 4))
    out = token_cross_entropy(logits, labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, token_cross_entropy(logits.float(), labels))
    none = torch.full((2, 4), -100)
    assert token_cross_entropy(torch.randn(2, 4, 5, requires_grad=True), none).item() == 0.0


def test_loss_module_reads_the_engine_count_from_the_batch():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5))
    loss = build_loss([("token_ce", 1.0, {})])
    batch = Batch(labels.clone(), labels, torch.arange(2))
    own = loss(ModelOutputs(logits), None, batch).loss
    batch.num_real_tokens = torch.tensor(16.0)  # twice the 8 predicted positions
    assert torch.allclose(loss(ModelOutputs(logits), None, batch).loss, own / 2)
    assert not loss.needs_teacher
