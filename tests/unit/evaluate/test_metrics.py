"""Metrics on cases small enough to compute by hand."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from kdkit.evaluate.metrics import classification_metrics, confusion, gain, reliability, summarize_seeds


def logits_for(predictions: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `predictions`."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 5.0


def logits_with_probs(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is `probs` (log-probabilities are valid logits)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


# labels 0 0 1 1 2 2, predicted 0 0 1 0 1 1; class 2 is never predicted.
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDICTED = [0, 0, 1, 0, 1, 1]


def test_accuracy_precision_recall_f1_by_hand():
    m = classification_metrics(logits_for(PREDICTED, 3), LABELS)
    # class 0: predicted at 0,1,3 → P 2/3, R 2/2, F1 0.8
    # class 1: predicted at 2,4,5 → P 1/3, R 1/2, F1 0.4
    # class 2: never predicted → P 0 (zero_division=0), R 0, F1 0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.4 + 0) / 3)


def test_a_class_absent_from_labels_and_predictions_counts_in_the_macro_mean():
    m = classification_metrics(logits_for(PREDICTED, 4), LABELS)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 0) / 4)
    assert m["f1_macro"] == pytest.approx((0.8 + 0.4 + 0 + 0) / 4)


def test_agreement_with_reference_and_nan_without():
    reference = logits_for([0, 0, 1, 1, 2, 1], 3)  # agrees with PREDICTED at positions 0, 1, 2, 5
    assert classification_metrics(logits_for(PREDICTED, 3), LABELS, reference)["agreement"] == pytest.approx(4 / 6)
    assert math.isnan(classification_metrics(logits_for(PREDICTED, 3), LABELS)["agreement"])


def test_ece_and_nll_by_hand_for_constant_confidence():
    # Every sample: confidence 0.8 in class 0; half of them are class 0. ECE = |0.8 − 0.5| = 0.3.
    logits = logits_with_probs([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 5 + [1] * 5)
    m = classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(0.3, abs=1e-6)
    assert m["nll"] == pytest.approx(-(5 * math.log(0.8) + 5 * math.log(0.2)) / 10, rel=1e-5)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    # Five samples at confidence 0.8 with four correct, five at 0.6 with three correct.
    logits = logits_with_probs([[0.8, 0.2]] * 5 + [[0.4, 0.6]] * 5)
    labels = torch.tensor([0, 0, 0, 0, 1] + [1, 1, 1, 0, 0])
    assert classification_metrics(logits, labels)["ece"] == pytest.approx(0.0, abs=1e-6)


def test_reliability_bins_add_up_to_the_ece():
    torch.manual_seed(0)
    logits = torch.randn(200, 5) * 2
    labels = torch.randint(0, 5, (200,))
    curve = reliability(logits, labels, n_bins=10)
    assert sum(curve["count"]) == 200
    assert len(curve["confidence"]) == len(curve["accuracy"]) == len(curve["count"]) <= 10
    assert curve["confidence"] == sorted(curve["confidence"])
    ece = sum(
        n / 200 * abs(a - c) for n, a, c in zip(curve["count"], curve["accuracy"], curve["confidence"], strict=True)
    )
    assert ece == pytest.approx(classification_metrics(logits, labels, ece_bins=10)["ece"], abs=1e-5)


def test_reliability_of_constant_confidence_is_one_bin():
    curve = reliability(logits_with_probs([[0.8, 0.2]] * 10), torch.tensor([0] * 5 + [1] * 5))
    assert curve["count"] == [10]
    assert curve["confidence"][0] == pytest.approx(0.8, abs=1e-6)
    assert curve["accuracy"] == [0.5]


def test_bf16_logits_are_accepted():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    labels = torch.randint(0, 4, (64,))
    m16 = classification_metrics(logits.bfloat16(), labels, logits.bfloat16())
    assert all(isinstance(v, float) for v in m16.values())
    assert m16["agreement"] == 1.0
    assert m16["accuracy"] == pytest.approx(classification_metrics(logits, labels)["accuracy"], abs=2 / 64)
    assert confusion(logits.bfloat16(), labels, 4).sum() == 64


def test_confusion_rows_true_columns_predicted():
    expected = np.array([[2, 0, 0], [1, 1, 0], [0, 2, 0]])
    np.testing.assert_array_equal(confusion(logits_for(PREDICTED, 3), LABELS, 3), expected)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reference_logits"):
        classification_metrics(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2))


def test_summarize_seeds_mean_and_population_std():
    per_seed = [{"accuracy": 0.9, "ece": 0.1, "note": "a"}, {"accuracy": 0.8, "ece": 0.3, "note": "b"}]
    s = summarize_seeds(per_seed)
    assert s["accuracy"] == pytest.approx(0.85)
    assert s["ece"] == pytest.approx(0.2)
    assert s["std"] == {"accuracy": pytest.approx(0.05), "ece": pytest.approx(0.1)}
    assert "note" not in s and "note" not in s["std"]
    assert s["per_seed"] == per_seed
    assert s["n_seeds"] == 2
    assert summarize_seeds(per_seed[:1])["std"]["accuracy"] == 0.0


def test_gain_pairs_seeds_by_position():
    student = [{"accuracy": 0.90, "f1_macro": 0.5, "ece": 0.10}, {"accuracy": 0.80, "f1_macro": 0.5, "ece": 0.10}]
    student.append({"accuracy": 0.85, "f1_macro": 0.5, "ece": 0.10})
    baseline = [{"accuracy": 0.88, "f1_macro": 0.4, "ece": 0.15}, {"accuracy": 0.79, "f1_macro": 0.4, "ece": 0.15}]
    baseline.append({"accuracy": 0.80, "f1_macro": 0.4, "ece": 0.15})
    g = gain(student, baseline)
    differences = [0.02, 0.01, 0.05]
    assert g["accuracy"]["mean"] == pytest.approx(statistics.mean(differences))
    assert g["accuracy"]["std"] == pytest.approx(statistics.pstdev(differences))
    assert g["accuracy"]["n"] == 3
    assert g["f1_macro"]["mean"] == pytest.approx(0.1)
    assert g["f1_macro"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert g["ece"]["mean"] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="pairs seeds"):
        gain(student, baseline[:2])
