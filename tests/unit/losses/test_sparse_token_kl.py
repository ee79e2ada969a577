"""The top-k (sparse) token loss, Ft.sparse_token_divergence, against hand-coarsened references and the dense loss."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.errors import CompatibilityError
from kdkit.losses import token_functional as Ft
from kdkit.losses.token_kl import TokenKL
from kdkit.types import Batch, ModelOutputs, SparseLogprobs

B, T, V = 2, 6, 13
CASES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0), ("tvd", 0.5)]


def _logits(seed: int = 0, b: int = B, t: int = T, v: int = V, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).requires_grad_()
    teacher = scale * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a masked prompt
    labels[-1, min(3, t - 1)] = -100  # a hole
    return student, teacher, labels


def _sparse(teacher: torch.Tensor, k: int, temperature: float = 1.0) -> SparseLogprobs:
    """The top-k of the teacher, made here with plain torch (independent of kdkit.data.lm_cache)."""
    log_p = torch.log_softmax(teacher.double() / temperature, dim=-1)
    lp, ids = log_p.topk(k, dim=-1)
    rest = torch.log1p(-lp.exp().sum(-1)) if k < teacher.shape[-1] else torch.full(lp.shape[:-1], -math.inf)
    return SparseLogprobs(ids, lp.float(), rest.float())


# ---- an independent reference: Python loops in float64 over the coarsened distributions ------------------------


def _softmax(xs):
    top = max(xs)
    es = [math.exp(x - top) for x in xs]
    return [e / sum(es) for e in es]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _div(p, q, direction, beta):
    if direction == "forward" or (direction == "jsd" and beta == 0.0):
        return _kl(p, q)
    if direction == "reverse" or (direction == "jsd" and beta == 1.0):
        return _kl(q, p)
    if direction == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def _coarse_reference(student, teacher, labels, k, direction, beta, temperature) -> float:
    s, t, lab = student.detach().double().tolist(), teacher.double().tolist(), labels.tolist()
    total, n = 0.0, 0
    for b in range(len(s)):
        for i in range(len(s[b]) - 1):
            if lab[b][i + 1] == -100:
                continue
            p = _softmax([x / temperature for x in t[b][i]])
            q = _softmax([x / temperature for x in s[b][i]])
            top = sorted(range(len(p)), key=lambda j: -p[j])[:k]
            others = [j for j in range(len(p)) if j not in top]
            pb = [p[j] for j in top] + [sum(p[j] for j in others)]
            qb = [q[j] for j in top] + [sum(q[j] for j in others)]
            total += temperature**2 * _div(pb, qb, direction, beta)
            n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("k,temperature", [(3, 1.0), (5, 2.5), (1, 1.0)])
def test_equals_the_divergence_of_the_hand_coarsened_distributions(direction, beta, k, temperature):
    student, teacher, labels = _logits()
    got = Ft.sparse_token_divergence(student, _sparse(teacher, k, temperature), labels, direction, beta, temperature)
    want = _coarse_reference(student, teacher, labels, k, direction, beta, temperature)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) < 2e-5 * max(1.0, abs(want))


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_with_k_equal_to_v_it_is_the_dense_loss_in_value_and_gradient(direction, beta, chunk_size):
    student, teacher, labels = _logits(1)
    sparse = _sparse(teacher, V, 2.0)
    assert torch.isinf(sparse.rest).all()  # nothing outside the top V
    got = Ft.sparse_token_divergence(student, sparse, labels, direction, beta, 2.0, chunk_size=chunk_size)
    (g_sparse,) = torch.autograd.grad(got, student)
    want = Ft.token_divergence(student, teacher, labels, direction, beta, 2.0)
    (g_dense,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(g_sparse).all()


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coarsening_never_raises_the_divergence(direction, beta, seed):
    student, teacher, labels = _logits(seed, scale=3.0)
    dense = Ft.token_divergence(student, teacher, labels, direction, beta, 1.5)
    for k in (1, 4, 9):
        sparse = Ft.sparse_token_divergence(student, _sparse(teacher, k, 1.5), labels, direction, beta, 1.5)
        assert 0.0 <= sparse.item() <= dense.item() + 1e-6
    # and per position, not only on average
    s, t = student[0].detach(), teacher[0]
    sp = _sparse(t, 4)
    per_sparse = Ft.sparse_per_position_divergence(s, sp.ids, sp.logprobs, sp.rest, direction, beta)
    per_dense = Ft.per_position_divergence(s, t, direction, beta)
    assert (per_sparse <= per_dense + 1e-6).all()


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_zero_when_the_student_is_the_teacher(direction, beta, chunk_size):
    _, teacher, labels = _logits(3)
    student = teacher.clone().requires_grad_()
    for k in (1, 5, V):
        loss = Ft.sparse_token_divergence(
            student, _sparse(teacher, k, 1.7), labels, direction, beta, 1.7, chunk_size=chunk_size
        )
        assert abs(loss.item()) < 1e-6


def test_a_student_matching_only_the_buckets_costs_nothing():
    """Moving the student's mass around inside the rest bucket is invisible to the top-k loss."""
    _, teacher, labels = _logits(4)
    sparse = _sparse(teacher, 3)
    student = teacher.clone()
    # shuffle the logits of the ids outside the top 3 at every position: the rest mass stays the same
    for b in range(B):
        for t in range(T):
            others = [j for j in range(V) if j not in sparse.ids[b, t].tolist()]
            perm = torch.tensor(others)[torch.randperm(len(others), generator=torch.Generator().manual_seed(b * T + t))]
            student[b, t, others] = teacher[b, t, perm]
    assert Ft.token_divergence(student, teacher, labels).item() > 1e-3  # the dense loss sees the difference
    assert abs(Ft.sparse_token_divergence(student, sparse, labels).item()) < 1e-6


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masked_positions_are_never_read(direction, chunk_size):
    student, teacher, labels = _logits(5)
    sparse = _sparse(teacher, 4)
    clean = Ft.sparse_token_divergence(student, sparse, labels, direction, chunk_size=chunk_size)
    (g_clean,) = torch.autograd.grad(clean, student)
    # garbage where nothing counts: positions before a masked label, and the last position (predicts nothing)
    dirty_student = student.detach().clone()
    ids, lp, rest = sparse.ids.clone(), sparse.logprobs.clone(), sparse.rest.clone()
    for b, t in [(0, 0), (1, 2), (0, T - 1), (1, T - 1)]:
        assert t == T - 1 or labels[b, t + 1] == -100
        dirty_student[b, t] = float("nan")
        lp[b, t], rest[b, t], ids[b, t] = float("nan"), float("nan"), 10**6  # an id no gather could survive
    dirty_student.requires_grad_()
    dirty = Ft.sparse_token_divergence(
        dirty_student, SparseLogprobs(ids, lp, rest), labels, direction, chunk_size=chunk_size
    )
    (g_dirty,) = torch.autograd.grad(dirty, dirty_student)
    assert dirty.item() == pytest.approx(clean.item(), abs=1e-7)
    torch.testing.assert_close(g_dirty, g_clean)
    assert (g_clean[0, 0] == 0).all() and (g_clean[1, 2] == 0).all() and (g_clean[:, T - 1] == 0).all()


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_equals_unchunked(direction, beta, chunk_size):
    student, teacher, labels = _logits(6)
    sparse = _sparse(teacher, 5, 2.0)
    full = Ft.sparse_token_divergence(student, sparse, labels, direction, beta, 2.0)
    (g_full,) = torch.autograd.grad(full, student)
    chunked = Ft.sparse_token_divergence(student, sparse, labels, direction, beta, 2.0, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_chunked, g_full, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
@pytest.mark.parametrize("k", [3, V])
def test_gradcheck_in_float64(direction, k):
    student, teacher, labels = _logits(7, b=1, t=4, v=6)
    sparse = _sparse(teacher, min(k, 6))
    sparse = SparseLogprobs(sparse.ids, sparse.logprobs.double(), sparse.rest.double())
    s = student.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: Ft.sparse_token_divergence(x, sparse, None, direction, 0.3, 1.3), (s,))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradient_goes_only_into_the_student(chunk_size):
    student, teacher, labels = _logits(8)
    sparse = _sparse(teacher, 4)
    lp = sparse.logprobs.clone().requires_grad_()
    rest = sparse.rest.clone().requires_grad_()
    loss = Ft.sparse_token_divergence(student, SparseLogprobs(sparse.ids, lp, rest), labels, chunk_size=chunk_size)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert lp.grad is None and rest.grad is None


def test_float16_storage_and_renormalisation():
    """The cache stores log-probs in float16: the teacher's k + 1 masses then add up to 1 only to ~1e-3. The loss
    renormalises them, so it stays ≥ 0 and exactly 0 for a student equal to the renormalised teacher, and is close
    to the float32 value."""
    student, teacher, labels = _logits(9)
    sp = _sparse(teacher, 4)
    half = SparseLogprobs(sp.ids, sp.logprobs.half(), sp.rest.half())
    exact = Ft.sparse_token_divergence(student, sp, labels)
    rounded = Ft.sparse_token_divergence(student, half, labels)
    assert rounded.dtype == torch.float32
    assert abs(rounded.item() - exact.item()) < 1e-2 * exact.item()
    mass = half.logprobs.float().exp().sum(-1) + half.rest.float().exp()
    assert (mass - 1).abs().max() > 1e-5  # float16 does lose the normalisation ...
    zero = Ft.sparse_token_divergence(teacher.clone().requires_grad_(), half, labels)
    assert 0.0 <= zero.item() < 1e-4  # ... and renormalising keeps the loss a divergence


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_global_count_makes_accumulation_exact(chunk_size):
    student, teacher, labels = _logits(10, b=4)
    sparse = _sparse(teacher, 3)
    whole = Ft.sparse_token_divergence(student, sparse, labels, chunk_size=chunk_size)
    n = Ft.count_real_tokens(labels)
    parts = sum(
        Ft.sparse_token_divergence(
            student[i : i + 2],
            SparseLogprobs(sparse.ids[i : i + 2], sparse.logprobs[i : i + 2], sparse.rest[i : i + 2]),
            labels[i : i + 2],
            num_real_tokens=torch.tensor(n),
            chunk_size=chunk_size,
        )
        for i in (0, 2)
    )
    torch.testing.assert_close(parts, whole)


def test_bad_sparse_shapes_fail_clearly():
    student, teacher, labels = _logits()
    sp = _sparse(teacher, 3)
    with pytest.raises(ValueError, match="do not fit student logits"):
        Ft.sparse_token_divergence(student, SparseLogprobs(sp.ids[:1], sp.logprobs[:1], sp.rest[:1]), labels)
    with pytest.raises(ValueError, match="direction"):
        Ft.sparse_token_divergence(student, sp, labels, direction="kl")
    with pytest.raises(ValueError, match="more than the student's 2 logits"):
        Ft.sparse_token_divergence(student[..., :2], sp, labels)


# ---- TokenKL with a teacher from the cache ------------------------------------------------------------------


def _batch(labels):
    return Batch(inputs=torch.zeros_like(labels), labels=labels, index=torch.arange(labels.shape[0]))


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
def test_token_kl_uses_the_sparse_path_and_equals_dense_at_k_equal_v(direction):
    student, teacher, labels = _logits(11)
    loss = TokenKL(direction=direction, temperature=2.0, chunk_size=3)
    sparse_out = ModelOutputs(logits=None, sparse=_sparse(teacher, V, 2.0))
    got = loss(ModelOutputs(student), sparse_out, _batch(labels))
    want = loss(ModelOutputs(student), ModelOutputs(teacher), _batch(labels))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sp4 = _sparse(teacher, 4, 2.0)
    got4 = loss(ModelOutputs(student), ModelOutputs(None, sparse=sp4), _batch(labels))
    torch.testing.assert_close(got4, Ft.sparse_token_divergence(student, sp4, labels, direction, 0.5, 2.0))


def test_token_kl_refuses_cached_ids_beyond_the_students_vocabulary():
    student, teacher, labels = _logits(12)
    wide = torch.cat([teacher, torch.full((B, T, 3), 10.0)], dim=-1)  # the teacher's 3 extra ids are its favourites
    sparse = ModelOutputs(None, sparse=_sparse(wide, 4))
    with pytest.raises(CompatibilityError, match=f"token id 1[345], beyond the student's {V} logits"):
        TokenKL()(ModelOutputs(student), sparse, _batch(labels))
    # a shared vocabulary narrower than the student also bounds the ids
    ok = ModelOutputs(None, sparse=_sparse(teacher[..., :9], 4))
    TokenKL(vocab_size=9)(ModelOutputs(student), ok, _batch(labels))
    with pytest.raises(CompatibilityError, match="student's 8 logits"):
        TokenKL(vocab_size=8)(ModelOutputs(student), ok, _batch(labels))


# ---- the error of the top-k cache against the dense teacher -----------------------------------------------


def test_topk_kl_error_is_zero_at_k_equal_v():
    student, teacher, labels = _logits(13)
    err = Ft.topk_kl_error(student, teacher, _sparse(teacher, V, 1.5), labels, 1.5)
    assert err["tokens"] == Ft.count_real_tokens(labels)
    assert err["dense_kl"] > 0.1
    assert err["abs_error"] < 1e-5 and err["rel_error"] < 1e-5 and abs(err["teacher_kl"]) < 1e-6
    assert err["topk_mass"] == pytest.approx(1.0, abs=1e-6)


def test_topk_kl_error_by_hand_on_one_position():
    teacher = torch.tensor([[[3.0, 1.0, 0.0, -1.0, 2.0]]])  # one position; top 2: ids 0 and 4
    student = torch.tensor([[[0.0, 1.0, 2.0, 0.5, 1.0]]])
    err = Ft.topk_kl_error(student, teacher, _sparse(teacher, 2), None, shift=False)
    p = _softmax(teacher[0, 0].tolist())
    q = _softmax(student[0, 0].tolist())
    rest = 1 - p[0] - p[4]
    p_hat = [p[0], rest / 3, rest / 3, rest / 3, p[4]]
    dense = _kl(p, q)
    coarse = _kl([p[0], p[4], rest], [q[0], q[4], 1 - q[0] - q[4]])
    assert err["dense_kl"] == pytest.approx(dense, rel=1e-5)
    assert err["sparse_kl"] == pytest.approx(coarse, rel=1e-5)
    assert err["abs_error"] == pytest.approx(dense - coarse, rel=1e-4)
    assert err["rel_error"] == pytest.approx((dense - coarse) / dense, rel=1e-4)
    assert err["teacher_kl"] == pytest.approx(_kl(p, p_hat), rel=1e-4)
    assert err["topk_mass"] == pytest.approx(p[0] + p[4], rel=1e-6)


def test_topk_kl_error_shrinks_as_k_grows():
    student, teacher, labels = _logits(14, v=40, scale=3.0)
    errs = [Ft.topk_kl_error(student, teacher, _sparse(teacher, k), labels, chunk_size=3) for k in (2, 8, 20, 39)]
    assert all(a["abs_error"] >= b["abs_error"] - 1e-7 for a, b in zip(errs, errs[1:]))
    assert all(a["teacher_kl"] >= b["teacher_kl"] - 1e-7 for a, b in zip(errs, errs[1:]))
    assert all(e["sparse_kl"] <= e["dense_kl"] + 1e-6 for e in errs)
