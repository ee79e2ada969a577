"""token_kl and token_ce with shift: false divide by the positions they actually predict (issue #13, bug 2).

The engine gives every micro-batch its share of the optimizer step's global count: batch.num_real_tokens counts
shifted positions (labels[:, 1:] ≠ -100), batch.num_labelled_tokens unshifted ones (labels ≠ -100). A loss with
shift: false must use the second, or, when the engine gives none, its own count; never the shifted one.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses import TokenCE, TokenKL, build_loss
from kdkit.types import Batch, ModelOutputs

# One sequence of T = 3 positions over V = 2 tokens; labels[0, 2] is padding.
LABELS = torch.tensor([[1, 0, -100]])
STUDENT = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [9.0, -9.0]]])  # q = (1/4, 3/4), (3/4, 1/4)
TEACHER = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [-9.0, 9.0]]])  # p = (1/2, 1/2) at the two real positions


def _kl_half_vs(q: tuple[float, float]) -> float:
    """KL((1/2, 1/2) ‖ q) by hand."""
    return sum(0.5 * math.log(0.5 / qi) for qi in q)


# shift false: positions 0 and 1 count (labels 1 and 0 there); both have the same KL to the uniform teacher.
KL_UNSHIFTED_SUM = _kl_half_vs((0.25, 0.75)) + _kl_half_vs((0.75, 0.25))
# token_ce, shift false: −log q(1 | t=0) − log q(0 | t=1) = 2 · (−log 3/4)
CE_UNSHIFTED_SUM = -2 * math.log(0.75)
SHIFTED_COUNT = 1  # what predicted_positions gives for these labels: labels[:, 1:] ≠ -100 → only labels[0, 1]


def _batch(**counts) -> Batch:
    batch = Batch(LABELS.clone(), LABELS.clone(), torch.arange(1))
    for key, value in counts.items():
        setattr(batch, key, torch.tensor(float(value)))
    return batch


def test_hand_computed_values_without_an_engine_count():
    kl = TokenKL(shift=False)(ModelOutputs(STUDENT), ModelOutputs(TEACHER), _batch())
    ce = TokenCE(shift=False)(ModelOutputs(STUDENT), None, _batch())
    assert kl.item() == pytest.approx(KL_UNSHIFTED_SUM / 2, rel=1e-6)
    assert ce.item() == pytest.approx(CE_UNSHIFTED_SUM / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["token_kl", "token_ce"])
def test_shift_false_never_divides_by_the_shifted_engine_count(name):
    # The engine as it is today sets only the shifted count (1 here); the loss must not divide by it.
    loss = build_loss([(name, 1.0, {"shift": False})])
    got = loss(ModelOutputs(STUDENT), ModelOutputs(TEACHER), _batch(num_real_tokens=SHIFTED_COUNT)).loss
    want = (KL_UNSHIFTED_SUM if name == "token_kl" else CE_UNSHIFTED_SUM) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["token_kl", "token_ce"])
def test_shift_false_divides_by_the_engine_unshifted_count(name):
    # The step's global count of labelled positions (e.g. 8 over several micro-batches and processes).
    loss = build_loss([(name, 1.0, {"shift": False})])
    got = loss(ModelOutputs(STUDENT), ModelOutputs(TEACHER), _batch(num_real_tokens=1, num_labelled_tokens=8)).loss
    want = (KL_UNSHIFTED_SUM if name == "token_kl" else CE_UNSHIFTED_SUM) / 8
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["token_kl", "token_ce"])
def test_shift_true_still_divides_by_the_shifted_engine_count(name):
    loss = build_loss([(name, 1.0, {})])
    batch = _batch(num_real_tokens=4, num_labelled_tokens=8)
    got = loss(ModelOutputs(STUDENT), ModelOutputs(TEACHER), batch).loss
    # shift true: only position 0 counts (it predicts labels[0, 1] = 0): KL((1/2, 1/2) ‖ (1/4, 3/4)), −log 1/4
    want = _kl_half_vs((0.25, 0.75)) if name == "token_kl" else -math.log(0.25)
    assert got.item() == pytest.approx(want / 4, rel=1e-6)


@pytest.mark.parametrize("shift", [True, False])
def test_micro_batches_with_the_engine_share_add_up_to_the_whole_step(shift):
    # Two micro-batches with different numbers of real positions. The engine's share of the step's count is
    # (global count) / 2 for each, and the step's loss is the mean of the micro-batch losses: it must equal the
    # loss over the whole step divided by the global count of the loss's own convention.
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    labels = torch.randint(0, 5, (4, 6))
    labels[0, 2:] = -100
    labels[3, 4:] = -100

    def count(lab: torch.Tensor, shifted: bool) -> float:
        keep = lab != -100
        return float((keep[:, 1:] if shifted else keep).sum())

    halves = [slice(0, 1), slice(1, 4)]
    shares = {
        key: sum(count(labels[h], key == "num_real_tokens") for h in halves) / 2
        for key in ("num_real_tokens", "num_labelled_tokens")
    }
    for cls in (TokenKL, TokenCE):
        loss = cls(shift=shift)
        parts = []
        for h in halves:
            batch = Batch(labels[h].clone(), labels[h], torch.arange(len(labels[h])))
            for key, value in shares.items():
                setattr(batch, key, torch.tensor(value))
            parts.append(loss(ModelOutputs(s[h]), ModelOutputs(t[h]), batch))
        whole = loss(ModelOutputs(s), ModelOutputs(t), Batch(labels.clone(), labels, torch.arange(4)))
        torch.testing.assert_close(sum(parts) / 2, whole)
