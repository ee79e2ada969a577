"""The loss mathematics of kdkit.losses.functional, checked against explicit formulas and independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import functional as Fk


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    """KL(p‖q) = Σ p (log p − log q), by hand."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _soft_kl_by_hand(student: list[float], teacher: list[float], temperature: float) -> float:
    p = _softmax([x / temperature for x in teacher])
    q = _softmax([x / temperature for x in student])
    return _kl(p, q) * temperature**2


def _random_logits(seed: int, shape: tuple[int, int] = (8, 10), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _random_labels(seed: int, batch: int = 8, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))


STUDENT_1x3 = [1.0, 2.0, 0.5]
TEACHER_1x3 = [2.0, 0.0, 1.0]


# --- soft_kl ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kl_matches_hand_computed_kl_times_t_squared(temperature):
    expected = _soft_kl_by_hand(STUDENT_1x3, TEACHER_1x3, temperature)
    got = Fk.soft_kl(torch.tensor([STUDENT_1x3]), torch.tensor([TEACHER_1x3]), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_kl_scales_by_t_squared():
    # T=1 and T=4 against the explicit formula: the value at T is KL at T multiplied by T², not KL alone.
    s, t = torch.tensor([STUDENT_1x3]), torch.tensor([TEACHER_1x3])
    kl_t4 = _kl(_softmax([x / 4 for x in TEACHER_1x3]), _softmax([x / 4 for x in STUDENT_1x3]))
    assert Fk.soft_kl(s, t, 1.0).item() == pytest.approx(_kl(_softmax(TEACHER_1x3), _softmax(STUDENT_1x3)), rel=1e-6)
    assert Fk.soft_kl(s, t, 4.0).item() == pytest.approx(16 * kl_t4, rel=1e-6)
    assert Fk.soft_kl(s, t, 4.0).item() != pytest.approx(kl_t4, rel=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_soft_kl_gradient_is_q_minus_p_times_t_over_batch(temperature):
    # d/ds [T²/B · Σ KL(p‖q)] = T²/B · (q − p)/T = (q − p)·T/B with q = softmax(s/T), p = softmax(t/T).
    s = _random_logits(0).requires_grad_()
    t = _random_logits(1)
    Fk.soft_kl(s, t, temperature).backward()
    q = torch.softmax(s.detach().double() / temperature, dim=-1)
    p = torch.softmax(t.double() / temperature, dim=-1)
    expected = (q - p) * temperature / s.shape[0]
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_soft_kl_gradient_magnitude_does_not_shrink_with_temperature():
    # Because of T², the gradient tends to centre(s − t)/(C·B) as T grows instead of vanishing as 1/T.
    s0, t = _random_logits(2), _random_logits(3)
    batch, classes = s0.shape
    norms = {}
    for temperature in (4.0, 16.0, 1000.0):
        s = s0.clone().requires_grad_()
        Fk.soft_kl(s, t, temperature).backward()
        norms[temperature] = s.grad.norm().item()
        if temperature == 1000.0:
            d = s0 - t
            limit = (d - d.mean(dim=-1, keepdim=True)) / (classes * batch)
            torch.testing.assert_close(s.grad, limit, rtol=2e-2, atol=1e-4)
    assert 0.5 < norms[16.0] / norms[4.0] < 2.0
    assert 0.5 < norms[1000.0] / norms[4.0] < 2.0


def test_soft_kl_is_kl_teacher_to_student_not_the_reverse():
    s, t = torch.tensor([STUDENT_1x3]), torch.tensor([TEACHER_1x3])
    p, q = _softmax(TEACHER_1x3), _softmax(STUDENT_1x3)
    forward, reverse = _kl(p, q), _kl(q, p)
    assert abs(forward - reverse) > 1e-2  # the case is asymmetric enough to tell the two apart
    assert Fk.soft_kl(s, t, 1.0).item() == pytest.approx(forward, rel=1e-6)
    assert Fk.soft_kl(s, t, 1.0).item() != pytest.approx(reverse, rel=1e-3)
    assert Fk.soft_kl(t, s, 1.0).item() == pytest.approx(reverse, rel=1e-6)


def test_soft_kl_is_zero_when_student_equals_teacher():
    x = _random_logits(4)
    assert Fk.soft_kl(x, x.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_soft_kl_is_non_negative(seed):
    s, t = _random_logits(10 + seed), _random_logits(20 + seed)
    assert Fk.soft_kl(s, t, 2.0).item() >= 0.0


def test_soft_kl_batch_value_is_the_mean_of_per_row_values():
    s, t = _random_logits(5, (4, 6)), _random_logits(6, (4, 6))
    per_row = [Fk.soft_kl(s[i : i + 1], t[i : i + 1], 3.0) for i in range(4)]
    assert Fk.soft_kl(s, t, 3.0).item() == pytest.approx(torch.stack(per_row).mean().item(), rel=1e-6)
    assert Fk.soft_kl(s, t, 3.0).item() != pytest.approx(torch.stack(per_row).sum().item(), rel=1e-3)


def test_soft_kl_is_invariant_to_a_constant_added_to_a_row():
    s, t = _random_logits(7, (3, 5)), _random_logits(8, (3, 5))
    shift = torch.tensor([[0.0], [100.0], [-50.0]])
    base = Fk.soft_kl(s, t, 2.0)
    torch.testing.assert_close(Fk.soft_kl(s + shift, t, 2.0), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Fk.soft_kl(s, t - shift, 2.0), base, rtol=1e-5, atol=1e-5)


# --- fp32 for every loss ------------------------------------------------------------------------------------------

LABELS_8 = _random_labels(30)
ALL_LOSSES = {
    "cross_entropy": lambda s, t: Fk.cross_entropy(s, LABELS_8),
    "cross_entropy_smoothed": lambda s, t: Fk.cross_entropy(s, LABELS_8, 0.1),
    "soft_kl": lambda s, t: Fk.soft_kl(s, t, 4.0),
    "hard_teacher": lambda s, t: Fk.hard_teacher(s, t),
    "dkd": lambda s, t: Fk.dkd(s, t, LABELS_8, 1.0, 8.0, 4.0),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_inputs_are_computed_in_fp32(name):
    fn = ALL_LOSSES[name]
    s, t = _random_logits(31).bfloat16(), _random_logits(32).bfloat16()
    got = fn(s, t)
    assert got.dtype == torch.float32
    assert abs(got.item() - fn(s.float(), t.float()).item()) <= 1e-6


@pytest.mark.parametrize("name", ["soft_kl", "hard_teacher", "dkd"])
def test_no_gradient_reaches_the_teacher(name):
    s = _random_logits(33).requires_grad_()
    t = _random_logits(34).requires_grad_()
    ALL_LOSSES[name](s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or not t.grad.any()


# --- cross_entropy and hard_teacher -------------------------------------------------------------------------------


def test_cross_entropy_hand_value():
    expected = -math.log(_softmax(STUDENT_1x3)[1])
    got = Fk.cross_entropy(torch.tensor([STUDENT_1x3]), torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_label_smoothing_hand_value():
    # Target distribution (1 − ε)·onehot + ε/C: loss = (1 − ε)(−log q_y) + ε/C · Σ_c (−log q_c).
    eps, q = 0.2, _softmax(STUDENT_1x3)
    expected = (1 - eps) * -math.log(q[1]) + eps / 3 * sum(-math.log(qc) for qc in q)
    got = Fk.cross_entropy(torch.tensor([STUDENT_1x3]), torch.tensor([1]), label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() != pytest.approx(-math.log(q[1]), rel=1e-3)


def test_hard_teacher_hand_value_uses_the_teacher_argmax():
    # The teacher's top class is 0; the student's is 1: the loss is −log q_0.
    expected = -math.log(_softmax(STUDENT_1x3)[0])
    got = Fk.hard_teacher(torch.tensor([STUDENT_1x3]), torch.tensor([TEACHER_1x3]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_hard_teacher_equals_cross_entropy_with_teacher_argmax_labels():
    s, t = _random_logits(40), _random_logits(41)
    expected = F.cross_entropy(s, t.argmax(dim=-1))
    torch.testing.assert_close(Fk.hard_teacher(s, t), expected)


# --- dkd ----------------------------------------------------------------------------------------------------------


def _dkd_reference(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Decoupled KD as written in mdistiller (mdistiller/distillers/DKD.py, Zhao et al. 2022), in float64."""
    logits_student, logits_teacher = logits_student.double(), logits_teacher.double()
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdim=True), (t * other_mask).sum(1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0), (0.0, 1.0, 3.0), (1, 1, 1)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_dkd_matches_the_mdistiller_reference(alpha, beta, temperature, seed):
    s, t, y = _random_logits(50 + seed), _random_logits(60 + seed), _random_labels(70 + seed)
    got = Fk.dkd(s, t, y, alpha, beta, temperature)
    expected = _dkd_reference(s, t, y, alpha, beta, temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_dkd_is_zero_when_student_equals_teacher():
    x, y = _random_logits(80), _random_labels(81)
    assert Fk.dkd(x, x.clone(), y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_dkd_parts_recompose_kd():
    # Zhao et al. 2022, eq. (1), per example: KD = TCKD + (1 − p_t)·NCKD, p_t the teacher's target probability at T.
    s, t, y, temperature = _random_logits(90), _random_logits(91), _random_labels(92), 2.0
    for i in range(s.shape[0]):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd = Fk.dkd(si, ti, yi, alpha=1.0, beta=0.0, temperature=temperature)
        nckd = Fk.dkd(si, ti, yi, alpha=0.0, beta=1.0, temperature=temperature)
        p_t = torch.softmax(ti / temperature, dim=-1)[0, yi[0]]
        torch.testing.assert_close(tckd + (1 - p_t) * nckd, Fk.soft_kl(si, ti, temperature), rtol=1e-5, atol=1e-6)


def test_dkd_stays_finite_when_both_models_are_certain():
    # A softmax of a 200-logit gap underflows to exactly 0 in fp32; log(1 − p_t) must not become log(0).
    s = torch.zeros(2, 5)
    s[:, 0] = 200.0
    s.requires_grad_()
    t = torch.zeros(2, 5)
    t[:, 0] = 300.0
    value = Fk.dkd(s, t, torch.tensor([0, 0]), 1.0, 8.0, 1.0)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(s.grad).all()
