"""Span likelihood matching (kdkit.losses.span_likelihood): hand-computed spans, the first-token rule, numerics, and
the whole path from two tokenizers' alignment against a plain-loop reference."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

from kdkit.data.align import align_batch
from kdkit.losses.base import ParamError
from kdkit.losses.span_likelihood import (
    SpanLikelihood,
    binary_kl,
    log1mexp,
    span_likelihood_loss,
    span_loglik,
    token_logprobs,
)
from kdkit.types import Batch, ModelOutputs

CORPUS = [
    "the king walks into the hall and the lords bow",
    "my lord the queen is sick and calls for her son",
    "to be or not to be that is the question",
]
TEXTS = ["the king walks into the hall", "my lord, the queen is sick", "to be or not"]


def _bkl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def test_pieces_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    ids = torch.tensor([[2, 0, 1]])
    lp = token_logprobs(logits, ids)
    z0 = math.log(1 + math.e + math.e**2)
    z1 = math.log(math.e + 1 + math.exp(-1))
    assert lp[0, 0].item() == 0.0  # nothing predicts the first token
    assert lp[0, 1].item() == pytest.approx(0.0 - z0)  # logits at 0 predict id 0 at 1
    assert lp[0, 2].item() == pytest.approx(0.0 - z1)  # logits at 1 predict id 1 at 2
    sums = span_loglik(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[-1, 0, 0, 1]]), 3)
    assert sums.tolist() == [[5.0, 4.0, 0.0]]
    assert binary_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(_bkl(0.5, 0.25))


def test_log1mexp_is_accurate_at_both_ends():
    xs = torch.tensor([-1e-10, -1e-6, -0.1, -0.6931, -0.6932, -5.0, -50.0], dtype=torch.float64)
    with localcontext() as ctx:  # 50-digit decimal arithmetic as ground truth, independent of float tricks
        ctx.prec = 50
        expected = [float((1 - Decimal(x).exp()).ln()) for x in xs.tolist()]
    torch.testing.assert_close(log1mexp(xs), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    x = torch.tensor([-1e-7, -0.5, -3.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def _hand_case():
    # teacher: <bos>, then tokens of log-probs -0.5, -0.7 (span 0) and -2.0 (span 1)
    # student: <bos>, then one token of -1.2 (span 0) and two of -0.3, -0.4 (span 1)
    t_lp = torch.tensor([[0.0, -0.5, -0.7, -2.0]])
    s_lp = torch.tensor([[0.0, -1.2, -0.3, -0.4]], requires_grad=True)
    t_span = torch.tensor([[-1, 0, 0, 1]])
    s_span = torch.tensor([[-1, 0, 1, 1]])
    return s_lp, t_lp, s_span, t_span, torch.tensor([[True, True]])


def test_hand_computed():
    s_lp, t_lp, s_span, t_span, mask = _hand_case()
    # span 0: ll −1.2 on both sides (different tokenisations, same likelihood) → 0; span 1: e^−2 against e^−0.7
    loss = span_likelihood_loss(s_lp, t_lp, s_span, t_span, mask)
    assert loss.item() == pytest.approx((0.0 + _bkl(math.exp(-2.0), math.exp(-0.7))) / 2, rel=1e-6)
    tau = span_likelihood_loss(s_lp, t_lp, s_span, t_span, mask, temperature=2.0)
    assert tau.item() == pytest.approx(_bkl(math.exp(-1.0), math.exp(-0.35)) / 2, rel=1e-6)
    counted = span_likelihood_loss(s_lp, t_lp, s_span, t_span, mask, num_real=4)
    assert counted.item() == pytest.approx(loss.item() * 2 / 4, rel=1e-6)
    # a masked span is not counted
    one = span_likelihood_loss(s_lp, t_lp, s_span, t_span, torch.tensor([[False, True]]))
    assert one.item() == pytest.approx(_bkl(math.exp(-2.0), math.exp(-0.7)), rel=1e-6)


def test_spans_holding_a_first_token_are_left_out():
    s_lp, t_lp, _, t_span, mask = _hand_case()
    no_bos = torch.tensor([[0, 0, 1, 1]])  # the student's span 0 starts at its token 0: no position predicts it
    loss = span_likelihood_loss(s_lp, t_lp, no_bos, t_span, mask)
    # span 1 alone; the student's token 0 log-prob (0 by convention) is never read
    expected = _bkl(math.exp(-2.0), math.exp(-0.7))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    s_bad = s_lp.detach().clone()
    s_bad[0, 0] = -123.0
    assert span_likelihood_loss(s_bad, t_lp, no_bos, t_span, mask).item() == pytest.approx(expected, rel=1e-6)


def test_certain_spans_stay_finite_and_gradient_is_students_only():
    s_lp, t_lp, s_span, t_span, mask = _hand_case()
    certain = torch.zeros_like(s_lp, requires_grad=True)  # the student is sure of every span
    value = span_likelihood_loss(certain, t_lp, s_span, t_span, mask)
    assert torch.isfinite(value) and value > 0
    both = span_likelihood_loss(torch.zeros(1, 4), torch.zeros(1, 4), s_span, t_span, mask)
    assert both.item() == 0.0
    t_lp = t_lp.clone().requires_grad_()
    span_likelihood_loss(s_lp, t_lp, s_span, t_span, mask).backward()
    assert t_lp.grad is None
    assert s_lp.grad[0, 0] == 0 and s_lp.grad[0, 1] == 0  # span 0 already matches: no gradient there
    assert s_lp.grad[0, 2] == s_lp.grad[0, 3] != 0  # span 1: one gradient for all its tokens (through their sum)


@pytest.fixture(scope="module")
def tokenizer_pair():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    wp = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    )
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return bpe, wp


def _reference(aligned, student_logits, teacher_logits, tau=1.0) -> float:
    """Plain loops: each span's log-likelihood from log_softmax at the previous position, spans holding a token 0
    left out, binarised KL per span, mean."""
    total, n = 0.0, 0
    for r, row in enumerate(aligned.spans):
        for sp in row:
            if sp.teacher[0] == 0 or sp.student[0] == 0:
                continue
            lls = []
            for (a, b), logits, ids in (
                (sp.teacher, teacher_logits[r], aligned.teacher.input_ids[r]),
                (sp.student, student_logits[r], aligned.student.input_ids[r]),
            ):
                lls.append(sum(torch.log_softmax(logits[i - 1].double(), -1)[ids[i]].item() for i in range(a, b)))
            total += _bkl(math.exp(lls[0] / tau), math.exp(lls[1] / tau))
            n += 1
    return total / n


def test_whole_path_from_two_tokenizers(tokenizer_pair):
    bpe, wp = tokenizer_pair
    aligned = align_batch(bpe, wp, TEXTS)
    b, t_t = aligned.teacher.input_ids.shape
    t_s = aligned.student.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    student = (0.5 * torch.randn(b, t_s, wp.get_vocab_size(), generator=g)).requires_grad_()
    teacher = (0.5 * torch.randn(b, t_t, bpe.get_vocab_size(), generator=g)).requires_grad_()
    batch = Batch(aligned.student.input_ids, aligned.student.input_ids, torch.arange(b))
    loss = SpanLikelihood(temperature=3.0)
    value = loss(ModelOutputs(student), ModelOutputs(teacher), batch, alignment=aligned)
    assert value.item() == pytest.approx(_reference(aligned, student.detach(), teacher.detach(), 3.0), rel=1e-5)
    assert aligned.spans[0][0].teacher[0] == 0  # the BPE side has no BOS: its first span is left out
    value.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert loss.describe() == "span_likelihood(tau=3)"


def test_identical_models_give_zero(tokenizer_pair):
    bpe, _ = tokenizer_pair
    aligned = align_batch(bpe, bpe, TEXTS)
    logits = torch.randn(*aligned.teacher.input_ids.shape, bpe.get_vocab_size())
    batch = Batch(aligned.student.input_ids, aligned.student.input_ids, torch.arange(len(TEXTS)))
    value = SpanLikelihood()(ModelOutputs(logits), ModelOutputs(logits.clone()), batch, alignment=aligned)
    assert value.item() == 0.0
    with pytest.raises(ParamError, match="temperature=-1"):
        SpanLikelihood(temperature=-1)
