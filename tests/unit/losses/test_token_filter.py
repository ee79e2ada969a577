"""AdaSPEC's token filter (TokenKL drop_hardest, Ft.drop_hardest_labels): the hardest fraction of real positions
gets no loss and no gradient; the kept positions are averaged (or divided by the given count × kept / real); padding
is never counted or dropped; both teachers (dense and cached top-k); the fused head steps aside.

The hand-made batch: B = 2, T = 4, shift. Row 0 has all labels (positions 0, 1, 2 count), row 1 has labels[1, 3] =
-100 (positions 0, 1 count; position 2 would read that label). Teacher p = (½, ½) over two buckets; the student puts
q₀ = ½ + d on the first, so tvd = |p₀ − q₀| = d exactly and forward KL = −½ log(4 q₀ (1 − q₀)) grows with d.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.losses import build_loss
from kdkit.losses import token_functional as Ft
from kdkit.losses.base import ParamError
from kdkit.losses.token_kl import TokenKL
from kdkit.run.losses import loss_terms
from kdkit.types import Batch, ModelOutputs, SparseLogprobs

# d per (b, t); the 9s are positions that never count (row 1's masked position 2 and the last column): if either
# were ranked it would be the hardest; the student's logits there are NaN, so reading them at all poisons the loss.
D = [[0.10, 0.40, 0.05, 9.0], [0.30, 0.20, 9.0, 9.0]]
LABELS = torch.tensor([[1, 1, 1, 1], [1, 1, 1, -100]])
REAL = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
# drop_hardest = 0.4: floor(0.4 × 5) = 2 dropped, the two largest d: (0, 1) = 0.40 and (1, 0) = 0.30.
KEPT = [(0, 0), (0, 2), (1, 1)]
DROPPED = [(0, 1), (1, 0)]


def _batch(labels: torch.Tensor = LABELS, count: float | None = None) -> Batch:
    b = Batch(inputs=torch.zeros_like(labels), labels=labels.clone(), index=torch.arange(labels.shape[0]))
    b.num_real_tokens = None if count is None else torch.tensor(float(count))
    return b


def _dense():
    """Student (2, 4, 2) float64 with q₀ = ½ + d, teacher logits 0 (p = ½, ½)."""
    student = torch.zeros(2, 4, 2, dtype=torch.float64)
    for b, row in enumerate(D):
        for t, d in enumerate(row):
            q = 0.5 + d
            student[b, t, 0] = math.log(q / (1 - q)) if d < 0.5 else float("nan")
    return student.requires_grad_(), torch.zeros(2, 4, 2, dtype=torch.float64)


def _sparse():
    """Student (2, 4, 3) float64 whose first id has q₀ = ½ + d; the cached teacher keeps id 0 at p = ½ (rest ½)."""
    student = torch.zeros(2, 4, 3, dtype=torch.float64)
    for b, row in enumerate(D):
        for t, d in enumerate(row):
            q = 0.5 + d  # e^a / (e^a + 2) = q  ⇔  a = log(2q / (1 − q))
            student[b, t, 0] = math.log(2 * q / (1 - q)) if d < 0.5 else float("nan")
    half = torch.full((2, 4), math.log(0.5))
    sparse = SparseLogprobs(torch.zeros(2, 4, 1, dtype=torch.long), half.unsqueeze(-1).clone(), half.clone())
    return student.requires_grad_(), sparse


def _tvd(d: float) -> float:
    return d


def _forward_kl(d: float) -> float:
    q = 0.5 + d
    return 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))


def _mean(fn, positions) -> float:
    return sum(fn(D[b][t]) for b, t in positions) / len(positions)


def _topk(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    """(ids, logprobs, rest) of the teacher's k most likely ids at `temperature`."""
    lp = torch.log_softmax(teacher / temperature, -1)
    top = lp.topk(k, -1)
    rest = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return top.indices, top.values, rest


# ---- drop_hardest = 0 is the loss without the filter ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("count", [None, 7.5])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
def test_zero_is_exactly_the_loss_without_the_filter(direction, chunk_size, count):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 5, generator=g).requires_grad_()
    teacher = torch.randn(2, 4, 5, generator=g)
    sparse = SparseLogprobs(*_topk(teacher, 3, temperature=2.0))
    n = None if count is None else torch.tensor(float(count))
    kw = dict(direction=direction, temperature=2.0, chunk_size=chunk_size)
    with_zero, default = TokenKL(drop_hardest=0.0, **kw), TokenKL(**kw)
    dense = Ft.token_divergence(student, teacher, LABELS, direction, 0.5, 2.0, True, n, chunk_size)
    cached = Ft.sparse_token_divergence(student, sparse, LABELS, direction, 0.5, 2.0, True, n, chunk_size)
    for t_out, want in ((ModelOutputs(teacher), dense), (ModelOutputs(None, sparse=sparse), cached)):
        got = with_zero(ModelOutputs(student), t_out, _batch(count=count))
        assert torch.equal(got, default(ModelOutputs(student), t_out, _batch(count=count)))
        assert torch.equal(got, want)
    assert with_zero.describe() == default.describe()


# ---- the kept set and the value, by hand -----------------------------------------------------------------------


def test_the_hardest_positions_labels_are_dropped_and_padding_is_never_ranked():
    table = torch.tensor(D)
    seen = []

    def values_at(r, c):
        seen.extend(zip(r.tolist(), c.tolist()))
        return table[r, c]

    labels, kept, n_real = Ft.drop_hardest_labels(values_at, LABELS, 2, 4, 0.4, shift=True, chunk_size=2)
    assert sorted(seen) == REAL  # only real positions are ranked, in chunks
    assert (kept, n_real) == (3, 5)
    want = LABELS.clone()
    for b, t in DROPPED:
        want[b, t + 1] = -100  # with shift, position t is compared with label t + 1
    assert torch.equal(labels, want)
    assert torch.equal(LABELS, torch.tensor([[1, 1, 1, 1], [1, 1, 1, -100]]))  # the caller's labels are untouched
    # without shift, position t is label t: row 1's position 3 is padding, the others count (7 real)
    flat, kept, n_real = Ft.drop_hardest_labels(lambda r, c: table[r, c], LABELS, 2, 4, 0.3, shift=False)
    assert (kept, n_real) == (5, 7)  # floor(0.3 × 7) = 2: the two 9s at (0, 3) and (1, 2)
    assert flat.tolist() == [[1, 1, 1, -100], [1, 1, -100, -100]]


def test_ties_drop_the_earlier_position_and_small_batches_drop_nothing():
    values = torch.tensor([[0.1, 0.2, 0.2, 0.2]])
    labels = torch.ones(1, 4, dtype=torch.long)
    # 0.5 × 4 = 2 of three tied 0.2s: the two earlier ones
    out, kept, _ = Ft.drop_hardest_labels(lambda r, c: values[r, c], labels, 1, 4, 0.5, shift=False)
    assert out.tolist() == [[1, -100, -100, 1]] and kept == 2
    # floor(0.3 × 4) = 1: the earliest
    out, kept, _ = Ft.drop_hardest_labels(lambda r, c: values[r, c], labels, 1, 4, 0.3, shift=False)
    assert out.tolist() == [[1, -100, 1, 1]] and kept == 3
    out, _, _ = Ft.drop_hardest_labels(lambda r, c: values[r, c], labels, 1, 4, 0.2, shift=False)
    assert out is labels  # floor(0.8) = 0: nothing dropped, the labels themselves
    # many ties (where an unstable sort permutes them): 1 at every third of 3000 positions, half dropped = all
    # 1000 ones and the first 500 zeros
    values = torch.zeros(1, 3000)
    values[0, ::3] = 1.0
    out, kept, _ = Ft.drop_hardest_labels(
        lambda r, c: values[r, c], torch.ones(1, 3000, dtype=torch.long), 1, 3000, 0.5, shift=False
    )
    dropped = (out[0] == -100).nonzero().flatten().tolist()
    assert kept == 1500 and dropped == [p for p in range(3000) if p % 3 == 0 or p < 750]  # 500 zeros below 750
    # a NaN ranks lowest: kept, so that the loss shows it
    nan = torch.tensor([[0.1, float("nan"), 0.2, 0.3]])
    out, _, _ = Ft.drop_hardest_labels(lambda r, c: nan[r, c], labels, 1, 4, 0.75, shift=False)
    assert out.tolist() == [[-100, 1, -100, -100]]
    assert Ft.drop_count(100, 0.29) == 29 and Ft.drop_count(5, 0.99) == 4 and Ft.drop_count(0, 0.5) == 0


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("direction, fn", [("tvd", _tvd), ("forward", _forward_kl)])
def test_dense_value_is_the_mean_over_the_kept_positions(direction, fn, chunk_size):
    student, teacher = _dense()
    loss = TokenKL(direction=direction, drop_hardest=0.4, chunk_size=chunk_size)
    got = loss(ModelOutputs(student), ModelOutputs(teacher), _batch())
    assert got.item() == pytest.approx(_mean(fn, KEPT), rel=1e-12)
    assert got.item() != pytest.approx(_mean(fn, REAL), rel=1e-3)  # the filter changed it


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("direction, fn", [("tvd", _tvd), ("forward", _forward_kl)])
def test_sparse_value_is_the_mean_over_the_kept_positions(direction, fn, chunk_size):
    student, sparse = _sparse()
    loss = TokenKL(direction=direction, drop_hardest=0.4, chunk_size=chunk_size)
    got = loss(ModelOutputs(student), ModelOutputs(None, sparse=sparse), _batch())
    assert got.item() == pytest.approx(_mean(fn, KEPT), rel=1e-6)  # the cache's buckets are renormalised in fp32
    assert got.item() != pytest.approx(_mean(fn, REAL), rel=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_no_gradient_reaches_dropped_positions(teacher_kind, chunk_size):
    student, t = _dense() if teacher_kind == "dense" else _sparse()
    t_out = ModelOutputs(t) if teacher_kind == "dense" else ModelOutputs(None, sparse=t)
    TokenKL(direction="tvd", drop_hardest=0.4, chunk_size=chunk_size)(ModelOutputs(student), t_out, _batch()).backward()
    grad = student.grad
    assert torch.isfinite(grad).all()
    for b, t in DROPPED + [(1, 2), (0, 3), (1, 3)]:
        assert grad[b, t].abs().sum() == 0, (b, t)
    for b, t in KEPT:
        assert grad[b, t].abs().sum() > 0, (b, t)


# ---- the count: the engine's, a constructor's, accumulation ------------------------------------------------------


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_a_given_count_is_scaled_by_kept_over_real(teacher_kind):
    student, t = _dense() if teacher_kind == "dense" else _sparse()
    t_out = ModelOutputs(t) if teacher_kind == "dense" else ModelOutputs(None, sparse=t)
    kept_sum = sum(D[b][t] for b, t in KEPT)
    # the engine's share of the step's count: 10 real tokens → N' = 10 × 3 / 5 = 6
    engine = TokenKL(direction="tvd", drop_hardest=0.4)(ModelOutputs(student), t_out, _batch(count=10))
    assert engine.item() == pytest.approx(kept_sum / 6, rel=1e-6)
    own = TokenKL(direction="tvd", drop_hardest=0.4, num_real_tokens=10)(ModelOutputs(student), t_out, _batch())
    assert own.item() == pytest.approx(kept_sum / 6, rel=1e-6)
    # a count passed to forward() wins over both
    call = TokenKL(direction="tvd", drop_hardest=0.4, num_real_tokens=10)(
        ModelOutputs(student), t_out, _batch(count=10), num_real_tokens=20
    )
    assert call.item() == pytest.approx(kept_sum / 12, rel=1e-6)


def test_micro_batches_keeping_the_same_share_add_up_to_the_mean_over_the_steps_kept_tokens():
    student, teacher = _dense()
    loss = TokenKL(direction="tvd", drop_hardest=0.4)
    # two micro-batches of the hand batch, the second with the rows swapped: 10 real tokens, 3 + 3 kept
    s2, l2 = student.flip(0), LABELS.flip(0)
    total = loss(ModelOutputs(student), ModelOutputs(teacher), _batch(count=10)) + loss(
        ModelOutputs(s2), ModelOutputs(teacher), _batch(l2, count=10)
    )
    assert total.item() == pytest.approx(2 * sum(D[b][t] for b, t in KEPT) / 6, rel=1e-12)


# ---- validation, description, the config path ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, 1, -0.1, 1.5, float("nan"), True, "0.2", None])
def test_out_of_range_values_name_the_parameter(bad):
    with pytest.raises(ParamError) as info:
        TokenKL(drop_hardest=bad)
    assert info.value.param == "drop_hardest"
    assert str(info.value) == f"drop_hardest={bad!r}; expected 0 <= drop_hardest < 1"


def test_describe_names_the_fraction():
    assert TokenKL(direction="tvd", drop_hardest=0.2).describe() == "token_kl(tvd, T=1, drop 20%)"
    assert TokenKL(direction="jsd", beta=0.3, temperature=2, drop_hardest=0.125).describe() == (
        "token_kl(jsd, beta=0.3, T=2, drop 12.5%)"
    )


def _draft_config(params: dict) -> dict:
    raw = yaml.safe_load((Path(__file__).parents[3] / "configs" / "llm_draft.yaml").read_text())
    raw["distill"]["losses"] = [{"name": "token_kl", "params": params}]
    return raw


def test_the_config_path_builds_the_filter():
    cfg = load_config(_draft_config({"direction": "tvd", "drop_hardest": 0.2}))
    loss = build_loss(loss_terms(cfg.distill.losses))
    (part,) = loss.parts
    assert isinstance(part, TokenKL) and part.drop_hardest == 0.2 and part.direction == "tvd"
    assert loss.formula() == "total = 1*token_kl(tvd, T=1, drop 20%)"
    bad = load_config(_draft_config({"direction": "tvd", "drop_hardest": 1}))
    with pytest.raises(ConfigError, match=r"^distill\.losses\.0\.params\.drop_hardest: drop_hardest=1; "
                                          r"expected 0 <= drop_hardest < 1$"):  # fmt: skip
        build_loss(loss_terms(bad.distill.losses))


# ---- the fused head steps aside ---------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_kind", ["dense", "sparse"])
def test_a_filtered_loss_does_not_fuse_and_runs_on_whole_logits(teacher_kind):
    """With the student's hidden state and head (what the engine passes when fuses_head), token_term gives None,
    WeightedLoss._fused steps aside, and the loss is the filtered loss on head(hidden); unfiltered, it fuses."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 5, bias=False).double()
    t_logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, 2, -100]])
    teacher = ModelOutputs(t_logits)
    if teacher_kind == "sparse":
        ids, lp, rest = _topk(t_logits, 2)
        teacher = ModelOutputs(None, sparse=SparseLogprobs(ids, lp.double(), rest.double()))
    params = {"direction": "tvd", "drop_hardest": 0.4, "chunk_size": 3}
    loss = build_loss([("token_kl", 1.0, params)])
    student = ModelOutputs(None, hidden=hidden, head=head)
    assert loss.parts[0].token_term(teacher, _batch(labels), 5, 1.0, 5) is None
    assert loss._fused(student, teacher, _batch(labels)) is None
    out = loss(student, teacher, _batch(labels))
    out.loss.backward()
    got_grad = hidden.grad.clone()
    hidden.grad = None

    logits = head(hidden)
    want = TokenKL(**params)(ModelOutputs(logits), teacher, _batch(labels))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    want.backward()
    torch.testing.assert_close(got_grad, hidden.grad)
    unfiltered = build_loss([("token_kl", 1.0, {**params, "drop_hardest": 0.0})])
    assert unfiltered._fused(student, teacher, _batch(labels)) is not None  # the same loss without the filter fuses
    assert unfiltered(student, teacher, _batch(labels)).loss.item() != pytest.approx(want.item(), rel=1e-3)
