"""Hybrid cross-tokenizer KL (kdkit.losses.hybrid_kl): the vocabulary map, a hand-computed case, the chain rule, and
the invariant that with identical tokenizers it is exactly kdkit's token_kl."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.data.align import align_batch
from kdkit.losses import token_functional as Ft
from kdkit.losses.base import ParamError
from kdkit.losses.hybrid_kl import HybridKL, hybrid_kl_loss, hybrid_per_position, shared_vocab, token_surfaces
from kdkit.losses.token_kl import TokenKL
from kdkit.types import Batch, ModelOutputs

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "the king walks into the hall and the lords bow",
    "my lord the queen is sick and calls for her son",
    "what light through yonder window breaks",
    "to be or not to be that is the question",
]
TEXTS = ["the king walks into the hall", "my lord the queen is sick", "to be or not"]


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<eos>"], initial_alphabet=alphabet)
    )
    return tok


@pytest.fixture(scope="module")
def wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    )
    return tok


# ----------------------------------------------------------------------------------------------------------------
# The shared vocabulary map.
# ----------------------------------------------------------------------------------------------------------------


def test_identical_vocabularies_map_every_id(bpe):
    t_ids, s_ids = shared_vocab(bpe, bpe)
    assert t_ids.tolist() == s_ids.tolist() == list(range(bpe.get_vocab_size()))


def test_map_pairs_tokens_by_decoded_text(bpe, wordpiece):
    t_ids, s_ids = shared_vocab(bpe, wordpiece)
    pairs = {bpe.id_to_token(int(a)): wordpiece.id_to_token(int(b)) for a, b in zip(t_ids, s_ids)}
    # byte-level "Ġthe" is " the", WordPiece's word-initial "the" too; "##nd" continues a word like BPE's "nd"
    assert pairs["Ġthe"] == "the" and pairs["Ġlord"] == "lord" and pairs["nd"] == "##nd"
    # a space-led BPE token pairs with a word-initial WordPiece token, a glued one with a "##" continuation
    assert all(a.startswith("Ġ") == (not b.startswith("##")) for a, b in pairs.items())
    # special tokens and byte tokens of split characters (which decode to U+FFFD) are never shared
    assert "<eos>" not in pairs and "Ĺ" not in pairs and not {"[UNK]", "[CLS]", "[SEP]"} & set(pairs.values())
    # the map is one to one, sorted by teacher id, and every pair has one surface text
    assert t_ids.unique().numel() == s_ids.unique().numel() == len(pairs) > 50
    assert t_ids.tolist() == sorted(t_ids.tolist())
    t_surf, s_surf = token_surfaces(bpe), token_surfaces(wordpiece)
    assert all(t_surf[a] == s_surf[b] is not None for a, b in zip(t_ids.tolist(), s_ids.tolist()))
    assert s_surf[wordpiece.token_to_id("the")] == " the" and t_surf[bpe.token_to_id("Ġthe")] == " the"


# ----------------------------------------------------------------------------------------------------------------
# The formula.
# ----------------------------------------------------------------------------------------------------------------


def _log(ps: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in ps]], dtype=torch.float64)


def test_hand_computed():
    # teacher p over 4 ids, student q over 3; shared: teacher 0 ↔ student 1, teacher 1 ↔ student 0
    p, q = [0.4, 0.3, 0.2, 0.1], [0.25, 0.5, 0.25]
    t_ids, s_ids = torch.tensor([0, 1]), torch.tensor([1, 0])
    m_p, m_q = 0.7, 0.75  # shared mass: 0.4 + 0.3; 0.5 + 0.25
    p_sh, q_sh = [0.4 / 0.7, 0.3 / 0.7], [0.5 / 0.75, 0.25 / 0.75]  # in map order
    uld_rest = abs(2 / 3 - 1.0) + abs(1 / 3 - 0.0)  # rest (0.2, 0.1)/0.3 against (0.25)/0.25, sorted, padded

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    forward = kl([m_p, 1 - m_p], [m_q, 1 - m_q]) + m_p * kl(p_sh, q_sh) + (1 - m_p) * uld_rest
    reverse = kl([m_q, 1 - m_q], [m_p, 1 - m_p]) + m_q * kl(q_sh, p_sh) + (1 - m_q) * uld_rest
    got = hybrid_per_position(_log(q), _log(p), t_ids, s_ids, "forward")
    assert got.item() == pytest.approx(forward, abs=1e-12)
    assert hybrid_per_position(_log(q), _log(p), t_ids, s_ids, "reverse").item() == pytest.approx(reverse, abs=1e-12)
    # T = 2: softmax(log p / 2) ∝ √p, then × 4
    sp, sq = [math.sqrt(x) for x in p], [math.sqrt(x) for x in q]
    p2, q2 = [x / sum(sp) for x in sp], [x / sum(sq) for x in sq]
    m_p2, m_q2 = p2[0] + p2[1], q2[1] + q2[0]
    rest2 = sorted([p2[2] / (1 - m_p2), p2[3] / (1 - m_p2)], reverse=True)
    expected2 = 4 * (
        kl([m_p2, 1 - m_p2], [m_q2, 1 - m_q2])
        + m_p2 * kl([p2[0] / m_p2, p2[1] / m_p2], [q2[1] / m_q2, q2[0] / m_q2])
        + (1 - m_p2) * (abs(rest2[0] - 1.0) + rest2[1])
    )
    got2 = hybrid_per_position(_log(q), _log(p), t_ids, s_ids, "forward", temperature=2.0)
    assert got2.item() == pytest.approx(expected2, abs=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chain_rule_equals_full_kl_when_the_rest_matches(direction):
    """When the unmatched parts are the same distribution in map order, KL_rest = ULD_rest = 0, so the hybrid is the
    exact KL between the teacher and the student with its ids renamed by the map."""
    g = torch.Generator().manual_seed(0)
    teacher = 2 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    perm = torch.randperm(7, generator=g)  # teacher id i ↔ student id perm[i]
    student = torch.empty_like(teacher)
    student[:, perm] = 2 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    rest = torch.tensor([5, 6])
    student[:, perm[rest]] = teacher[:, rest] + 0.7  # same shape on the rest, different mass
    shared = torch.arange(5)
    got = hybrid_per_position(student, teacher, shared, perm[shared], direction, temperature=1.5)
    full = Ft.per_position_divergence(student[:, perm], teacher, direction, temperature=1.5)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("direction", "temperature"), [("forward", 1.0), ("forward", 2.0), ("reverse", 1.0), ("reverse", 3.0)]
)
def test_identical_tokenizers_equal_token_kl(bpe, direction, temperature):
    """The invariant: identity map, every id shared ⇒ the hybrid is kdkit's own TokenKL at the aligned positions
    (same direction, temperature, T², masking, normalisation by the real count)."""
    aligned = align_batch(bpe, bpe, TEXTS)
    index = aligned.index
    v = bpe.get_vocab_size()
    b, t = aligned.teacher.input_ids.shape
    g = torch.Generator().manual_seed(1)
    student = (2 * torch.randn(b, t, v, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(b, t, v, generator=g)
    assert torch.equal(index.teacher_last, index.student_last)
    labels = torch.full((b, t), -100)
    rows, k = index.mask.nonzero(as_tuple=True)
    labels[rows, index.teacher_last[rows, k]] = 1  # exactly the aligned positions count
    batch = Batch(aligned.student.input_ids, labels, torch.arange(b))
    reference = TokenKL(direction=direction, temperature=temperature, shift=False)
    expected = reference(ModelOutputs(student), ModelOutputs(teacher), batch)

    loss = HybridKL(direction=direction, temperature=temperature)
    loss.set_vocab_map(*shared_vocab(bpe, bpe))
    got = loss(ModelOutputs(student), ModelOutputs(teacher), batch, alignment=aligned)
    assert torch.equal(got, expected), (got.item(), expected.item())  # the same arithmetic, bit for bit
    (g_ref,) = torch.autograd.grad(expected, student)
    (g_got,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-9)


def test_masking_normalisation_and_gradients():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 6, generator=g).requires_grad_()
    teacher = torch.randn(2, 4, 8, generator=g).requires_grad_()
    t_ids, s_ids = torch.tensor([0, 2, 5]), torch.tensor([4, 1, 0])
    s_pos, t_pos = torch.tensor([[0, 2, 4], [1, 3, 0]]), torch.tensor([[1, 2, 3], [0, 3, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = hybrid_kl_loss(student, teacher, s_pos, t_pos, mask, t_ids, s_ids, "forward", 2.0)
    pairs = [(0, 0, 1), (0, 2, 2), (0, 4, 3), (1, 1, 0), (1, 3, 3)]
    rows = [
        hybrid_per_position(student[b, s][None], teacher[b, t][None], t_ids, s_ids, "forward", 2.0) for b, s, t in pairs
    ]
    assert loss.item() == pytest.approx(torch.cat(rows).sum().item() / 5, rel=1e-6)
    count = hybrid_kl_loss(student, teacher, s_pos, t_pos, mask, t_ids, s_ids, "forward", 2.0, num_real=20)
    assert count.item() == pytest.approx(loss.item() * 5 / 20, rel=1e-6)
    loss.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad[0, 0].abs().sum() > 0
    assert student.grad[0, 1].abs().sum() == 0 and student.grad[1, 4].abs().sum() == 0  # never compared


def test_bad_maps_and_parameters_are_refused():
    s, t = torch.randn(3, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="every student id is shared but the other side has 1 unmatched"):
        hybrid_per_position(s, t, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="teacher_ids repeat an id"):
        hybrid_per_position(s, t, torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="student_ids range over \\[0, 4\\]; expected ids < 4"):
        hybrid_per_position(s, t, torch.tensor([0, 1]), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="direction='jsd'"):
        hybrid_per_position(s, t, torch.tensor([0]), torch.tensor([0]), "jsd")
    with pytest.raises(ParamError, match="direction='tvd'"):
        HybridKL(direction="tvd")
    empty = Batch(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.arange(1))
    with pytest.raises(ValueError, match="hybrid_kl: no vocabulary map"):
        HybridKL()(ModelOutputs(s[None]), ModelOutputs(t[None]), empty)


def test_the_orders_of_a_map_are_computed_once(monkeypatch):
    """HybridKL checks its map and orders the vocabulary once per map (VocabOrders), not every step: those checks
    read values back to the host. A second map gets its own orders."""
    import kdkit.losses.hybrid_kl as hk

    calls = []
    real = hk.vocab_orders
    monkeypatch.setattr(hk, "vocab_orders", lambda *a: calls.append(a) or real(*a))
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(1, 3, 6, generator=g), torch.randn(1, 3, 8, generator=g)
    index = torch.tensor([[0, 1, 2]])
    aligned = type("A", (), {"index": type("I", (), {"student_last": index, "teacher_last": index,
                                                     "mask": torch.ones(1, 3, dtype=torch.bool)})(),
                             "vocab_map": None})()
    loss = HybridKL()
    loss.set_vocab_map(torch.tensor([0, 2, 5]), torch.tensor([4, 1, 0]))
    batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.arange(1))
    values = [loss(ModelOutputs(student), ModelOutputs(teacher), batch, alignment=aligned) for _ in range(3)]
    assert len(calls) == 1 and values[0] == values[1] == values[2]
    expected = hybrid_kl_loss(student, teacher, index, index, torch.ones(1, 3, dtype=torch.bool),
                              torch.tensor([0, 2, 5]), torch.tensor([4, 1, 0]))
    assert torch.equal(values[0], expected)  # the functional form computes the orders itself
    calls.clear()
    loss.set_vocab_map(torch.tensor([1, 3]), torch.tensor([2, 5]))
    for _ in range(2):
        loss(ModelOutputs(student), ModelOutputs(teacher), batch, alignment=aligned)
    assert len(calls) == 1
