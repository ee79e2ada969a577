"""A model's logits at chosen positions (kdkit.losses.at_positions): the head applied to the gathered hidden rows, its
rows permuted for a column order, equals the whole logits gathered and permuted, in value and gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.data.align import take
from kdkit.losses.at_positions import in_order, logits_at
from kdkit.types import ModelOutputs


@pytest.mark.parametrize("bias", [False, True])
def test_head_at_positions_equals_gathered_logits(bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    head = nn.Linear(4, 7, bias=bias).double()
    positions = torch.tensor([[4, 0, 2], [1, 3, 0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    columns = torch.randperm(7, generator=g)
    for order in (None, columns, torch.arange(7)):
        got = logits_at(ModelOutputs(logits=None, hidden=hidden, head=head), positions, mask, order)
        whole = head(hidden)
        want = in_order(take(whole, positions, mask), order)
        assert got.shape == (4, 7)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.randn(got.shape, generator=g, dtype=torch.float64)
        grads_got = torch.autograd.grad((got * weights).sum(), [hidden, *head.parameters()])
        grads_want = torch.autograd.grad((want * weights).sum(), [hidden, *head.parameters()])
        for a, b in zip(grads_got, grads_want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Logits given whole, as a tensor or in ModelOutputs: gathered, then permuted.
    logits = torch.randn(2, 5, 7, generator=g)
    expected = logits[[0, 0, 1, 1], [4, 0, 1, 3]][:, columns]
    assert torch.equal(logits_at(logits, positions, mask, columns), expected)
    assert torch.equal(logits_at(ModelOutputs(logits=logits), positions, mask, columns), expected)
    rows = logits[0]
    assert in_order(rows, None) is rows and in_order(rows, torch.arange(7)) is rows  # no copy
