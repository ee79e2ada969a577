"""dkd: the value by hand, the authors' warm-up through set_epoch, Mixup/CutMix mixed labels (issue #13, bug 8)."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses import DecoupledKD, WeightedLoss, build_loss
from kdkit.losses import functional as Fk
from kdkit.types import Batch, ModelOutputs

STUDENT = [1.0, 0.0, -1.0]
TEACHER = [2.0, 1.0, 0.0]


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def dkd_by_hand(student: list[float], teacher: list[float], target: int, alpha: float, beta: float, t: float):
    """Zhao et al. 2022, eq. 6 for one example: α·TCKD + β·NCKD, times T²."""
    q, p = _softmax(student, t), _softmax(teacher, t)
    tckd = p[target] * math.log(p[target] / q[target]) + (1 - p[target]) * math.log((1 - p[target]) / (1 - q[target]))
    others = [i for i in range(len(p)) if i != target]
    p_hat = [p[i] / (1 - p[target]) for i in others]
    q_hat = [q[i] / (1 - q[target]) for i in others]
    nckd = sum(a * math.log(a / b) for a, b in zip(p_hat, q_hat))
    return (alpha * tckd + beta * nckd) * t * t


def _inputs(labels: list[int], mixed: list[int] | None = None, lam: float = 1.0):
    s, t = torch.tensor([STUDENT]), torch.tensor([TEACHER])
    batch = Batch(torch.zeros(1, 3), torch.tensor(labels), torch.arange(1))
    if mixed is not None:
        batch.mixed_labels, batch.mix_lambda = torch.tensor(mixed), lam
    return ModelOutputs(s), ModelOutputs(t), batch


def test_functional_matches_the_hand_computed_value():
    s, t, batch = _inputs([1])
    want = dkd_by_hand(STUDENT, TEACHER, 1, 1.0, 8.0, 2.0)
    assert Fk.dkd(s.logits, t.logits, batch.labels, 1.0, 8.0, 2.0).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(("epoch", "factor"), [(0.0, 0.0), (1.0, 0.25), (2.5, 0.625), (4.0, 1.0), (30.0, 1.0)])
def test_warmup_scales_the_loss_by_min_epoch_over_warmup(epoch, factor):
    s, t, batch = _inputs([1])
    loss = DecoupledKD(temperature=2.0, warmup_epochs=4)
    loss.set_epoch(epoch)
    want = factor * dkd_by_hand(STUDENT, TEACHER, 1, 1.0, 8.0, 2.0)
    assert loss(s, t, batch).item() == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_no_warmup_by_default_and_set_epoch_reaches_dkd_through_weighted_loss():
    s, t, batch = _inputs([0])
    full = dkd_by_hand(STUDENT, TEACHER, 0, 1.0, 8.0, 4.0)
    plain = build_loss([("dkd", 1.0, {})])
    plain.set_epoch(0.0)
    assert plain(s, t, batch).loss.item() == pytest.approx(full, rel=1e-5)
    warm = build_loss([("ce", 1.0, {}), ("dkd", 1.0, {"warmup_epochs": 2})])
    warm.set_epoch(0.5)  # the engine calls this before every micro-batch
    assert warm(s, t, batch).parts["dkd"].item() == pytest.approx(0.25 * full, rel=1e-5)
    assert "warm-up 2 ep" in warm.formula()


def test_mixed_labels_mix_the_target_class_as_cross_entropy_does():
    # Mixup: the input is 0.3·x_i + 0.7·x_j, so the DKD target is class 0 with 0.3 and class 2 with 0.7.
    s, t, batch = _inputs([0], mixed=[2], lam=0.3)
    want = 0.3 * dkd_by_hand(STUDENT, TEACHER, 0, 1.0, 8.0, 4.0) + 0.7 * dkd_by_hand(STUDENT, TEACHER, 2, 1.0, 8.0, 4.0)
    assert DecoupledKD()(s, t, batch).item() == pytest.approx(want, rel=1e-5)


def test_dkd_needs_labels_and_ce_does_not():
    assert DecoupledKD.needs_labels and build_loss([("ce", 1.0, {}), ("dkd", 1.0, {})]).needs_labels
    assert not build_loss([("ce", 1.0, {}), ("soft_kl", 1.0, {})]).needs_labels


def test_weighted_loss_forwards_set_epoch_to_every_part():
    seen = []

    class Spy(DecoupledKD):
        def set_epoch(self, epoch: float) -> None:
            seen.append(epoch)

    WeightedLoss([(1.0, Spy()), (0.0, Spy())]).set_epoch(1.25)
    assert seen == [1.25, 1.25]


@pytest.mark.parametrize("bad", [-1, float("nan"), "5"])
def test_warmup_epochs_must_be_a_number_at_least_zero(bad):
    with pytest.raises(ValueError, match="warmup_epochs"):
        DecoupledKD(warmup_epochs=bad)
