"""Perplexity, next-token accuracy, agreement and KL on held-out text, against values computed by hand."""

from __future__ import annotations

import math

import torch

from kdkit.data.lm import LMData
from kdkit.evaluate.lm import lm_metrics


def _fixed(table: torch.Tensor):
    """A 'model' whose logits at every position are table[token id] (a bigram model)."""
    return lambda ids: table[ids]


def test_hand_computed_bigram_models():
    # V = 3. Text: 0 1 2 0 (one block, 3 predicted positions: 0→1, 1→2, 2→0).
    data = LMData(torch.tensor([[0, 1, 2, 0]]), None, pad_id=0)
    teacher = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))
    student = torch.log(torch.tensor([[0.2, 0.6, 0.2], [0.6, 0.2, 0.2], [0.5, 0.25, 0.25]]))
    out = lm_metrics({"t": _fixed(teacher), "s": _fixed(student)}, data, 4, "cpu", teacher="t")
    nll_s = -(math.log(0.6) + math.log(0.2) + math.log(0.5)) / 3
    assert math.isclose(out["s"]["nll"], nll_s, rel_tol=1e-6)
    assert math.isclose(out["s"]["perplexity"], math.exp(nll_s), rel_tol=1e-6)
    assert math.isclose(out["s"]["accuracy"], 2 / 3)  # argmax 1 ✓, 0 ✗ (true 2), 0 ✓
    assert math.isclose(out["s"]["agreement"], 2 / 3)  # teacher argmax 1, 2, 0
    kl = 0.0
    for p, q in zip(teacher.exp(), student.exp()):
        kl += float((p * (p / q).log()).sum())
    assert math.isclose(out["s"]["kl"], kl / 3, rel_tol=1e-5)
    assert out["t"]["kl"] == 0.0 and out["t"]["agreement"] == 1.0
    assert out["s"]["tokens"] == 3
    # acceptance Σ min(p, q) per position: 0.1+0.6+0.1, 0.1+0.1+0.2, 0.5+0.1+0.1 (= 1 − TV each)
    assert math.isclose(out["s"]["acceptance"], (0.8 + 0.4 + 0.7) / 3, rel_tol=1e-5)
    assert math.isclose(out["t"]["acceptance"], 1.0, rel_tol=1e-6)


def test_padding_is_not_scored_and_all_tokens_weigh_equally():
    table = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    ids = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    data = LMData(ids, torch.tensor([4, 2]), pad_id=0)  # row 1: one predicted position (1→0); the rest is padding
    out = lm_metrics({"m": _fixed(table)}, data, 1, "cpu")  # batch size 1: per-token, not per-block averaging
    expected = -(math.log(0.5) + math.log(0.1) + math.log(0.9) + math.log(0.9)) / 4
    assert math.isclose(out["m"]["nll"], expected, rel_tol=1e-6)
    assert out["m"]["tokens"] == 4
