"""Universal Logit Distillation (kdkit.losses.uld): hand-computed values, invariants, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses.base import ParamError
from kdkit.losses.uld import ULD, sorted_l1, uld_loss, uld_per_position
from kdkit.types import Batch, ModelOutputs


def _log(ps: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ps (up to rounding): their logs."""
    return torch.tensor([math.log(p) for p in ps], dtype=torch.float64)


def _reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> float:
    """Plain Python: softmax at T, sort descending, pad with zeros, Σ |difference|, × T²."""

    def softmax(xs):
        top = max(xs)
        es = [math.exp((x - top) / temperature) for x in xs]
        return sorted((e / sum(es) for e in es), reverse=True)

    p, q = softmax(teacher.tolist()), softmax(student.tolist())
    n = max(len(p), len(q))
    p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
    return temperature**2 * sum(abs(a - b) for a, b in zip(p, q))


def test_hand_computed():
    # p = (0.7, 0.2, 0.1); q = (0.5, 0.5) padded to (0.5, 0.5, 0): |0.2| + |0.3| + |0.1| = 0.6
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.5]])
    assert sorted_l1(p, q).item() == pytest.approx(0.6)
    assert sorted_l1(q, p).item() == pytest.approx(0.6)
    value = uld_per_position(_log([0.5, 0.5])[None], _log([0.1, 0.7, 0.2])[None])
    assert value.item() == pytest.approx(0.6, abs=1e-12)
    # T = 2: softmax(log p / 2) = √p / Σ√p, and the distance × 4
    sp, sq = [math.sqrt(x) for x in (0.7, 0.2, 0.1)], [math.sqrt(0.5)] * 2
    p2, q2 = [x / sum(sp) for x in sp], [x / sum(sq) for x in sq] + [0.0]
    expected = 4 * sum(abs(a - b) for a, b in zip(p2, q2))
    value = uld_per_position(_log([0.5, 0.5])[None], _log([0.7, 0.2, 0.1])[None], temperature=2.0)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_invariants():
    g = torch.Generator().manual_seed(0)
    teacher = 2 * torch.randn(4, 7, generator=g, dtype=torch.float64)
    student = 2 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    # zero for the same distribution under any permutation of the ids, and with extra ids of zero probability
    perm = teacher[:, torch.randperm(7, generator=g)]
    assert uld_per_position(perm, teacher).abs().max().item() < 1e-12
    padded = torch.cat([perm, torch.full((4, 3), -math.inf, dtype=torch.float64)], dim=1)
    assert uld_per_position(padded, teacher).abs().max().item() < 1e-12
    # symmetric, and within [0, 2] (an L1 distance between two distributions)
    forward, backward = uld_per_position(student, teacher), uld_per_position(teacher, student)
    torch.testing.assert_close(forward, backward)
    assert (forward > 0).all() and (forward <= 2).all()
    for row in range(4):
        assert forward[row].item() == pytest.approx(_reference(student[row], teacher[row]), abs=1e-12)
        value = uld_per_position(student[row : row + 1], teacher[row : row + 1], temperature=3.0).item()
        assert value == pytest.approx(_reference(student[row], teacher[row], 3.0), abs=1e-12)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, 5, generator=g).requires_grad_()
    teacher = torch.randn(2, 4, 9, generator=g).requires_grad_()  # requires_grad: must still get no gradient
    s_pos = torch.tensor([[1, 3, 5], [2, 0, 0]])
    t_pos = torch.tensor([[0, 2, 3], [1, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return student, teacher, s_pos, t_pos, mask


def test_loss_is_the_mean_over_real_positions_and_reads_nothing_else():
    student, teacher, s_pos, t_pos, mask = _batch()
    loss = uld_loss(student, teacher, s_pos, t_pos, mask, temperature=2.0)
    pairs = [(0, 1, 0), (0, 3, 2), (0, 5, 3), (1, 2, 1)]
    expected = sum(_reference(student[b, s].detach(), teacher[b, t].detach(), 2.0) for b, s, t in pairs) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a global count divides instead of the local one
    assert uld_loss(student, teacher, s_pos, t_pos, mask, 2.0, num_real=10).item() == pytest.approx(
        expected * 4 / 10, rel=1e-5
    )
    # NaN at every position not compared, and garbage positions under the mask, change nothing
    s_bad, t_bad = student.detach().clone(), teacher.detach().clone()
    s_bad[0, 0], s_bad[1, 5], t_bad[1, 3] = math.nan, math.nan, math.nan
    s_pos_bad, t_pos_bad = s_pos.clone(), t_pos.clone()
    s_pos_bad[1, 1:], t_pos_bad[1, 1:] = 5, 3
    assert uld_loss(s_bad, t_bad, s_pos_bad, t_pos_bad, mask, 2.0).item() == pytest.approx(loss.item(), rel=1e-6)
    # no real position: 0, and backward still works
    empty = uld_loss(student, teacher, s_pos, t_pos, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()


def test_gradient_reaches_the_student_only():
    student, teacher, s_pos, t_pos, mask = _batch(1)
    uld_loss(student, teacher, s_pos, t_pos, mask).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert student.grad[0, 0].abs().sum() == 0  # a position never compared gets no gradient


def test_half_precision_is_computed_in_float32():
    student, teacher, s_pos, t_pos, mask = _batch(2)
    s16, t16 = student.detach().bfloat16(), teacher.detach().bfloat16()
    loss = uld_loss(s16, t16, s_pos, t_pos, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(uld_loss(s16.float(), t16.float(), s_pos, t_pos, mask).item(), rel=1e-6)


def test_module_reads_the_alignment():
    from kdkit.data.align import AlignedBatch, Encoded, Span, span_index

    student, teacher, _, _, _ = _batch(3)
    spans = [[Span(0, 1, (0, 1), (1, 2)), Span(1, 3, (1, 4), (2, 6))], [Span(0, 2, (0, 2), (0, 3))]]
    index = span_index(spans, teacher_length=4, student_length=6)
    dummy = Encoded(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), [[], []])
    aligned = AlignedBatch(dummy, dummy, spans, index)
    batch = Batch(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long), torch.arange(2))
    loss = ULD(temperature=2.0)
    value = loss(ModelOutputs(student), ModelOutputs(teacher), batch, alignment=aligned)
    expected = uld_loss(student, teacher, index.student_last, index.teacher_last, index.mask, 2.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert index.teacher_last.tolist() == [[0, 3], [1, 0]] and index.student_last.tolist() == [[1, 5], [2, 0]]
    assert loss.describe() == "uld(T=2)"
    with pytest.raises(ValueError, match="uld: no alignment"):
        loss(ModelOutputs(student), ModelOutputs(teacher), batch)
    with pytest.raises(ParamError, match="temperature=0"):
        ULD(temperature=0)


def _padded_sort_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The definition, literally: both rows sorted in full, the narrower zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    ps = torch.nn.functional.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    qs = torch.nn.functional.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (ps - qs).abs().sum(-1)


@pytest.mark.parametrize(("wide", "narrow"), [(300, 40), (40, 300), (64, 64)])
def test_sorted_l1_by_topk_equals_the_padded_full_sort_in_value_and_gradient(wide, narrow):
    torch.manual_seed(wide + narrow)
    a_logits = (3 * torch.randn(6, wide, dtype=torch.float64)).requires_grad_()
    b_logits = (3 * torch.randn(6, narrow, dtype=torch.float64)).requires_grad_()
    got = sorted_l1(a_logits.softmax(-1), b_logits.softmax(-1))
    grads = torch.autograd.grad(got.sum(), (a_logits, b_logits))
    want = _padded_sort_l1(a_logits.softmax(-1), b_logits.softmax(-1))
    want_grads = torch.autograd.grad(want.sum(), (a_logits, b_logits))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_sorted_desc_is_torch_sort_with_its_gradient():
    """The CPU path (numpy's order, then a gather) gives torch.sort's values and, without ties, its gradient; a
    tensor without grad gets the values alone; a dtype numpy does not sort (bfloat16) goes through torch.sort."""
    from kdkit.losses.uld import sorted_desc

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 300, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.randn(5, 300, generator=g, dtype=torch.float64)
    got = sorted_desc(x)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    want = x.sort(dim=-1, descending=True).values
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
    plain = torch.rand(3, 7, generator=g)
    assert torch.equal(sorted_desc(plain), plain.sort(dim=-1, descending=True).values)
    half = plain.bfloat16()
    assert torch.equal(sorted_desc(half), half.sort(dim=-1, descending=True).values)
    assert sorted_desc(torch.zeros(2, 0)).shape == (2, 0)


def test_float32_order_by_integer_keys_is_argsort():
    """float32 rows are ordered by sorting int64 keys (the value's bits made monotone, above its column): the same
    order as numpy's argsort, for negatives, ±0, ±inf and ties; torch.sort's values and, without ties, its gradient."""
    import numpy as np

    from kdkit.losses.uld import _order_desc, sorted_desc

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 200, generator=g)
    x[:, :3], x[:, 3], x[:, 4:6], x[:, 6], x[:, 7:20] = 0.0, -0.0, float("inf"), float("-inf"), x[:, 20:33]
    order = _order_desc(x.numpy())
    assert order.dtype == np.int64 and sorted(order[0].tolist()) == list(range(200))  # a permutation
    np.testing.assert_array_equal(np.take_along_axis(x.numpy(), order, -1),
                                  np.take_along_axis(x.numpy(), np.argsort(-x.numpy(), axis=-1), -1))
    ordered = np.take_along_axis(x.numpy(), order, -1)
    assert (ordered[:, :-1] >= ordered[:, 1:]).all()  # descending
    y = torch.randn(5, 300, generator=g).requires_grad_()  # no ties
    weights = torch.randn(5, 300, generator=g)
    got = sorted_desc(y)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), y)
    want = y.sort(dim=-1, descending=True).values
    (grad_want,) = torch.autograd.grad((want * weights).sum(), y)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
