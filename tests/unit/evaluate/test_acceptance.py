"""Acceptance rate and expected accepted length of a speculative-decoding draft, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.evaluate.acceptance import (
    acceptance_curve,
    expected_accepted_length,
    mean_acceptance,
    token_acceptance,
)

NAN = float("nan")


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """(1, T, V) logits whose softmax is probs (T rows of V probabilities)."""
    return torch.tensor(probs, dtype=torch.float64).log()[None]


def test_hand_computed_two_and_three_token_vocabularies():
    # V = 2: Σ min = min(.7, .4) + min(.3, .6) = .7; V = 3: min(.5,.2) + min(.3,.3) + min(.2,.5) = .7 — and
    # 1 − TVD: ½(|.5−.2| + 0 + |.2−.5|) = .3.
    target = _logits([[0.7, 0.3, 1e-300], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    draft = _logits([[0.4, 0.6, 1e-300], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    alpha = token_acceptance(draft, target, shift=False)
    assert alpha.dtype == torch.float64 and alpha.shape == (1, 3)
    assert torch.allclose(alpha, torch.tensor([[0.7, 0.7, 1.0]], dtype=torch.float64), atol=1e-12)
    assert math.isclose(mean_acceptance(alpha), 0.8, rel_tol=1e-12)
    two = token_acceptance(_logits([[0.4, 0.6]]), _logits([[0.7, 0.3]]), shift=False)
    assert math.isclose(float(two[0, 0]), 0.7, rel_tol=1e-12)


def test_identical_models_accept_everything_and_yield_k_plus_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 5) * 3
    alpha = token_acceptance(logits, logits.clone())
    assert torch.isnan(alpha[:, -1]).all()  # shift: the last position predicts nothing
    assert torch.allclose(alpha[:, :-1], torch.ones(2, 8), atol=1e-6)
    assert token_acceptance(logits, logits, temperature=0.0)[:, :-1].eq(1).all()
    for k in (1, 3, 8):
        assert math.isclose(expected_accepted_length(alpha, k), k + 1, rel_tol=1e-5)


def test_disjoint_supports_accept_nothing_and_yield_one():
    big = 1e4
    target = torch.tensor([[[big, 0.0, 0.0], [0.0, big, 0.0], [big, 0.0, 0.0]]])  # all mass on ids 0 or 1
    draft = torch.tensor([[[0.0, 0.0, big], [0.0, 0.0, big], [0.0, big, 0.0]]])  # never the target's id
    alpha = token_acceptance(draft, target, shift=False)
    assert torch.equal(alpha, torch.zeros(1, 3))
    assert expected_accepted_length(alpha, 2) == 1.0
    assert acceptance_curve(alpha, ks=[1, 2, 3]) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_constant_alpha_matches_the_closed_form():
    for a in (0.0, 0.3, 0.61, 0.9, 0.999):
        alpha = torch.full((3, 20), a)
        for k in range(1, 9):
            closed = (1 - a ** (k + 1)) / (1 - a)
            assert math.isclose(expected_accepted_length(alpha, k), closed, rel_tol=1e-6), (a, k)
    assert acceptance_curve(torch.ones(1, 12)) == {k: float(k + 1) for k in range(1, 9)}


def test_hand_computed_expected_length_and_the_end_of_a_row():
    alpha = torch.tensor([[0.5, 0.8, 0.2, NAN]], dtype=torch.float64)  # the last position does not count
    # k = 2, starts 0 and 1 (start 2 has one real position ahead): 1 + .5 + .5·.8 = 1.9; 1 + .8 + .8·.2 = 1.96.
    assert math.isclose(expected_accepted_length(alpha, 2), (1.9 + 1.96) / 2, rel_tol=1e-12)
    # k = 1: 1 + α[t] at each of the three real starts.
    assert math.isclose(expected_accepted_length(alpha, 1), 1 + 1.5 / 3, rel_tol=1e-12)
    # k = 3: one start: 1 + .5 + .4 + .08.
    assert math.isclose(expected_accepted_length(alpha, 3), 1.98, rel_tol=1e-12)
    with pytest.raises(ValueError, match=r"^k: 4; no start has 4 consecutive real positions ahead \(longest run: 3\)"):
        expected_accepted_length(alpha, 4)


def test_masking_follows_the_shift_and_never_reads_masked_logits():
    torch.manual_seed(1)
    target, draft = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 4, 5, -100, -100]])
    alpha = token_acceptance(draft, target, labels)
    # shift: position t counts iff labels[b, t + 1] ≠ -100.
    counts = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    assert torch.equal(~torch.isnan(alpha), counts)
    reference = torch.minimum(target.softmax(-1), draft.softmax(-1)).sum(-1)
    assert torch.allclose(alpha[counts], reference[counts], atol=1e-6)
    # Garbage at the positions that do not count changes nothing.
    dirty_t, dirty_d = target.clone(), draft.clone()
    dirty_t[~counts] = float("nan")
    dirty_d[~counts] = float("inf")
    assert torch.equal(token_acceptance(dirty_d, dirty_t, labels).nan_to_num(-1), alpha.nan_to_num(-1))
    assert math.isclose(mean_acceptance(alpha), float(reference[counts].mean()), rel_tol=1e-6)
    # Expected length, k = 2: only row 0's start 1 (positions 1, 2) and start 2 (2, 3); row 1's start 0 (0, 1).
    a = reference.double()
    starts = [(0, 1), (0, 2), (1, 0)]
    expected = sum(1 + a[b, t] + a[b, t] * a[b, t + 1] for b, t in starts) / 3
    assert math.isclose(expected_accepted_length(alpha, 2), float(expected), rel_tol=1e-6)
    # An explicit mask restricts further: drop row 1.
    mask = torch.tensor([[True] * 5, [False] * 5])
    assert math.isclose(mean_acceptance(alpha, mask), float(reference[0, 1:4].mean()), rel_tol=1e-6)
    only_row0 = sum(1 + a[0, t] + a[0, t] * a[0, t + 1] for t in (1, 2)) / 2
    assert math.isclose(expected_accepted_length(alpha, 2, mask), float(only_row0), rel_tol=1e-6)


def test_temperature_scales_both_distributions():
    target, draft = _logits([[0.7, 0.2, 0.1]]), _logits([[0.2, 0.5, 0.3]])
    for tau in (0.5, 2.0):
        p, q = (target[0, 0] / tau).softmax(-1), (draft[0, 0] / tau).softmax(-1)
        alpha = token_acceptance(draft, target, temperature=tau, shift=False)
        assert math.isclose(float(alpha[0, 0]), float(torch.minimum(p, q).sum()), rel_tol=1e-12)
    # A higher temperature flattens both towards uniform: more overlap.
    values = [float(token_acceptance(draft, target, temperature=t, shift=False)[0, 0]) for t in (0.5, 1.0, 4.0)]
    assert values[0] < values[1] < values[2]


def test_greedy_mode_compares_the_argmax():
    target = _logits([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    draft = _logits([[0.4, 0.35, 0.25], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])  # argmax agrees, differs, agrees
    alpha = token_acceptance(draft, target, temperature=0.0, shift=False)
    assert alpha.tolist() == [[1.0, 0.0, 1.0]]
    assert token_acceptance(draft, target, temperature=1.0, shift=False)[0, 0] < 1.0  # sampling: below 1
    # k = 2 along 1, 0, 1: starts 0 → 1 + 1 + 0 = 2, start 1 → 1 + 0 = 1.
    assert expected_accepted_length(alpha, 2) == 1.5


def test_half_precision_is_computed_in_float32():
    torch.manual_seed(2)
    target, draft = torch.randn(1, 4, 50) * 4, torch.randn(1, 4, 50) * 4
    low = token_acceptance(draft.bfloat16(), target.bfloat16())
    ref = token_acceptance(draft.bfloat16().float(), target.bfloat16().float())
    assert low.dtype == torch.float32
    assert torch.equal(low.nan_to_num(-1), ref.nan_to_num(-1))


def test_chunking_equals_one_pass():
    torch.manual_seed(3)
    target, draft = torch.randn(3, 7, 11), torch.randn(3, 7, 11)
    whole = token_acceptance(draft, target)
    assert torch.allclose(token_acceptance(draft, target, chunk_size=2).nan_to_num(-1), whole.nan_to_num(-1))


def test_bad_arguments_name_the_field():
    x = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=r"^draft_logits: shape \(1, 3, 5\); expected \(B, T, V\) equal to"):
        token_acceptance(torch.zeros(1, 3, 5), x)
    with pytest.raises(ValueError, match=r"^temperature: -1.0; expected"):
        token_acceptance(x, x, temperature=-1.0)
    with pytest.raises(ValueError, match=r"^temperature: nan; expected"):
        token_acceptance(x, x, temperature=NAN)
    with pytest.raises(ValueError, match=r"^k: 0; expected an integer ≥ 1"):
        expected_accepted_length(torch.ones(1, 3), 0)
    with pytest.raises(ValueError, match=r"^alpha: no real position"):
        mean_acceptance(torch.full((1, 3), NAN))
    with pytest.raises(ValueError, match=r"^mask: shape \(1, 2\); expected alpha's \(1, 3\)"):
        mean_acceptance(torch.ones(1, 3), torch.ones(1, 2, dtype=torch.bool))


def test_the_curve_counts_the_same_starts_for_every_k_and_grows():
    """Row 0 has 2 real positions (high α), row 1 has 5 (low α): for k = 1 alone row 0 counts and lifts the mean,
    for k = 3 it does not; the curve uses the starts with 3 positions ahead for every k, so it grows with k."""
    nan = float("nan")
    alpha = torch.tensor([[0.9, 0.9, nan, nan, nan], [0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    alone = [expected_accepted_length(alpha, k) for k in (1, 2, 3)]
    assert alone[0] > alone[2]  # different starts per k: not comparable
    curve = acceptance_curve(alpha, ks=(1, 2, 3))
    assert list(curve.values()) == sorted(curve.values())
    assert curve[1] == pytest.approx(1.1) and curve[3] == pytest.approx(1.111)  # row 1's 3 starts: 1 + .1 + .01 + .001
    with pytest.raises(ValueError, match="horizon"):
        expected_accepted_length(alpha, 3, horizon=2)
