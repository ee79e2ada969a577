"""The offline teacher cache across tokenizers (#14): with k = V it gives the live teacher's losses (uld, hybrid_kl,
span_likelihood) through the real sources; the top-k losses against a slow reference for k < V; one cache read by a
second student tokenizer that cuts the same texts; one-line refusals (another teacher, texts, k, T, a cut file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdkit.data.cross_cache import CrossTopKCache, text_fingerprint
from kdkit.data.lm import build_lm_data
from kdkit.errors import DataError
from kdkit.losses import build_loss
from kdkit.losses.hybrid_kl import hybrid_topk_per_position, shared_vocab
from kdkit.losses.span_likelihood import SpanLikelihood
from kdkit.losses.uld import sorted_l1, topk_sorted_l1, uld_topk_per_position
from kdkit.run.cross_teacher import CachedCrossTeacher, CrossTeacher, cross_cache_key, teacher_tokens
from kdkit.teachers import Teacher, TeacherEnsemble
from kdkit.types import ModelOutputs

BLOCK = 24


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def frozen(folder):
    from kdkit.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm(str(folder))
    return TeacherEnsemble([Teacher(model)]), tok


def blocks(corpus, student_tok):
    return build_lm_data("text_folder", None, str(corpus), None, None, student_tok, BLOCK, 0.1, 0.2, 0, None,
                         with_text=True).train


def build(path, ensemble, teacher_tok, data, k, temperature=1.0, same=False, log=None):
    key = cross_cache_key(ensemble.fingerprint(), teacher_tok, 128, same)
    return CrossTopKCache.build_or_load(
        path, lambda: teacher_tokens(teacher_tok, data, 128, same), ensemble.members[0].logits, k, temperature, key,
        text_fingerprint(data), batch_size=8, log=log or (lambda m: None))


def hybrid(direction, temperature, teacher_tok, student_tok):
    loss = build_loss([("hybrid_kl", 1.0, {"direction": direction, "temperature": temperature})]).parts[0]
    loss.set_vocab_map(*shared_vocab(teacher_tok, student_tok))
    return loss


@pytest.fixture(scope="module")
def world(lm_world):
    """(corpus, the teacher ensemble (the `other` model: 100 tokens of its own), its tokenizer, the student's
    tokenizer (the 120-token one), the student's training blocks with texts)."""
    corpus, student_folder, teacher_folder = lm_world
    ensemble, teacher_tok = frozen(teacher_folder)
    student_tok = tokenizer(student_folder)
    return corpus, ensemble, teacher_tok, student_tok, blocks(corpus, student_tok)


def student_logits(batch, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch.inputs.shape, v, generator=g) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_v_cache_gives_the_live_losses(world, tmp_path, temperature):
    corpus, ensemble, teacher_tok, student_tok, data = world
    v_t = ensemble.members[0].model.get_output_embeddings().weight.shape[0]
    cache = build(tmp_path / "c", ensemble, teacher_tok, data, k=v_t, temperature=temperature)
    live = CrossTeacher(ensemble, teacher_tok, student_tok, data, max_length=128)
    cached = CachedCrossTeacher(cache, data)
    assert not live.same
    for start in (0, 8):
        batch = data.collate([data[i] for i in range(start, start + 8)])
        t_live, t_cached = live(batch), cached(batch)
        assert t_cached.logits is None and t_cached.sparse.ids.shape[-1] == v_t
        # The cached teacher tokens and the alignment are the live ones exactly.
        assert torch.equal(t_cached.alignment.teacher.input_ids, t_live.alignment.teacher.input_ids)
        assert t_cached.alignment.spans == t_live.alignment.spans
        student = ModelOutputs(logits=student_logits(batch, len(student_tok), start))
        losses = [build_loss([("uld", 1.0, {"temperature": temperature})]).parts[0],
                  hybrid("forward", temperature, teacher_tok, student_tok),
                  hybrid("reverse", temperature, teacher_tok, student_tok), SpanLikelihood(temperature=1.5)]
        for loss in losses:
            want, got = loss(student, t_live, batch), loss(student, t_cached, batch)
            assert got.item() > 0
            # float16 log-probs in the cache: equal to ~1e-3 (span_likelihood's float32 log-probs: ~1e-6)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=f"{loss.describe()}")
        span = SpanLikelihood()
        torch.testing.assert_close(span(student, t_cached, batch), span(student, t_live, batch), rtol=1e-5, atol=0)


def test_top_k_cache_losses_have_gradients_and_bound_uld(world, tmp_path):
    corpus, ensemble, teacher_tok, student_tok, data = world
    cache = build(tmp_path / "c", ensemble, teacher_tok, data, k=8)
    batch = data.collate([data[i] for i in range(8)])
    t_live, t_cached = CrossTeacher(ensemble, teacher_tok, student_tok, data, 128)(batch), CachedCrossTeacher(
        cache, data)(batch)
    logits = student_logits(batch, len(student_tok)).requires_grad_()
    student = ModelOutputs(logits=logits)
    uld = build_loss([("uld", 1.0, {})]).parts[0]
    got, full = uld(student, t_cached, batch), uld(student, t_live, batch)
    assert 0 < got.item() <= full.item() + 1e-4  # ULD_k: a lower bound of ULD (triangle inequality on the tails)
    total = got + hybrid("forward", 1.0, teacher_tok, student_tok)(student, t_cached, batch)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_topk_sorted_l1_by_hand_and_equal_to_uld_when_nothing_is_left():
    p_top = torch.tensor([[0.5, 0.3]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    # |0.5 − 0.6| + |0.3 − 0.2| + |0.2 − (0.1 + 0.1)| = 0.2
    torch.testing.assert_close(topk_sorted_l1(p_top, torch.tensor([0.2]), q), torch.tensor([0.2]))
    # count 1: the second slot is ignored, the tail 0.5 is compared with q past its largest: |0.5 − 0.6| + |0.5 − 0.4|
    p_one = torch.tensor([[0.5, 9.0]])
    torch.testing.assert_close(topk_sorted_l1(p_one, torch.tensor([0.5]), q, torch.tensor([1])), torch.tensor([0.2]))
    g = torch.Generator().manual_seed(1)
    for v_t, v_s in ((7, 11), (11, 7)):
        t, s = torch.randn(5, v_t, generator=g), torch.randn(5, v_s, generator=g)
        lp = t.log_softmax(-1).topk(v_t).values
        got = uld_topk_per_position(s, lp, torch.full((5,), float("-inf")))
        torch.testing.assert_close(got, sorted_l1(t.softmax(-1), s.softmax(-1)), rtol=1e-5, atol=1e-6)


def slow_hybrid_topk(s_logits, ids, lp, rest, t_map, s_map, direction):
    """The module docstring's formula, row by row in float64 with Python sets (T = 1)."""
    out = []
    pairs = dict(zip(t_map.tolist(), s_map.tolist()))
    for row in range(s_logits.shape[0]):
        q = s_logits[row].double().softmax(-1).tolist()
        buckets = torch.cat([lp[row].double(), rest[row:row + 1].double()]).softmax(-1).tolist()
        p_top, tail = dict(zip(ids[row].tolist(), buckets[:-1])), buckets[-1]
        shared = [(pairs[i], p) for i, p in p_top.items() if i in pairs]
        m_p, m_q = sum(p for _, p in shared), sum(q[j] for j, _ in shared)
        r_p, r_q = 1 - m_p, 1 - m_q

        def kl(a, b):
            return sum(x * np.log(x / y) for x, y in zip(a, b) if x > 0)

        p_sh, q_sh = [p / m_p for _, p in shared], [q[j] / m_q for j, _ in shared]
        if direction == "forward":
            mass, sh, w = kl([m_p, r_p], [m_q, r_q]), kl(p_sh, q_sh), (m_p, r_p)
        else:
            mass, sh, w = kl([m_q, r_q], [m_p, r_p]), kl(q_sh, p_sh), (m_q, r_q)
        known = sorted((p / r_p for i, p in p_top.items() if i not in pairs), reverse=True)
        picked = {j for j, _ in shared}
        q_rest = sorted((x / r_q for j, x in enumerate(q) if j not in picked), reverse=True)
        q_rest += [0.0] * max(0, len(known) - len(q_rest))
        uld = sum(abs(a - b) for a, b in zip(known, q_rest)) + abs(tail / r_p - sum(q_rest[len(known):]))
        out.append(mass + w[0] * sh + w[1] * uld)
    return torch.tensor(out)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_hybrid_topk_equals_a_slow_reference(direction):
    g = torch.Generator().manual_seed(2)
    v_t, v_s, k = 30, 20, 6
    t_map, s_map = torch.tensor([0, 2, 3, 5, 8, 13, 21]), torch.tensor([4, 0, 7, 1, 9, 3, 11])
    t = torch.randn(6, v_t, generator=g) * 2
    t[0, t_map] += 5  # a row whose top k is all shared
    t[1, t_map] -= 9  # and one with none
    lp, ids = t.log_softmax(-1).topk(k)
    rest = t.log_softmax(-1).scatter(-1, ids, float("-inf")).logsumexp(-1)
    s = torch.randn(6, v_s, generator=g)
    got = hybrid_topk_per_position(s, ids, lp, rest, t_map, s_map, direction)
    torch.testing.assert_close(got, slow_hybrid_topk(s, ids, lp, rest, t_map, s_map, direction).float(),
                               rtol=1e-4, atol=1e-5)


def permuted_tokenizer(tok, extra=("qqzx", "zxqq")):
    """The same BPE with every id reversed and unused tokens added: another vocabulary (ids, size) that cuts any
    text of this corpus into the same pieces."""
    import transformers
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    n = len(spec["model"]["vocab"])
    spec["model"]["vocab"] = {piece: n - 1 - i for piece, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = n - 1 - added["id"]
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                                 eos_token="<eos>", pad_token="<eos>")
    other.add_tokens(list(extra))
    return other


def test_a_second_student_tokenizer_reuses_the_cache(world, tmp_path):
    corpus, ensemble, teacher_tok, student_tok, data = world
    v_t = ensemble.members[0].model.get_output_embeddings().weight.shape[0]
    said: list[str] = []
    build(tmp_path / "c", ensemble, teacher_tok, data, k=v_t, log=said.append)
    second_tok = permuted_tokenizer(student_tok)
    assert len(second_tok) == len(student_tok) + 2 and second_tok.get_vocab() != student_tok.get_vocab()
    second = blocks(corpus, second_tok)
    assert not torch.equal(second.ids, data.ids) and second.texts == data.texts
    assert text_fingerprint(second) == text_fingerprint(data)  # the key holds no student ids

    def never():
        raise AssertionError("the cache was rebuilt")

    key = cross_cache_key(ensemble.fingerprint(), teacher_tok, 128, False)
    said.clear()
    cache = CrossTopKCache.build_or_load(tmp_path / "c", never, ensemble.members[0].logits, v_t, 1.0, key,
                                         text_fingerprint(second), log=said.append)
    assert said and said[0].startswith("teacher cache across tokenizers: reading")
    batch = second.collate([second[i] for i in range(8)])
    t_live = CrossTeacher(ensemble, teacher_tok, second_tok, second, 128)(batch)
    t_cached = CachedCrossTeacher(cache, second)(batch)
    student = ModelOutputs(logits=student_logits(batch, len(second_tok)))
    loss = hybrid("forward", 1.0, teacher_tok, second_tok)
    torch.testing.assert_close(loss(student, t_cached, batch), loss(student, t_live, batch), rtol=1e-3, atol=1e-5)
    # A student that cuts the corpus elsewhere holds other texts: refused in one line, not silently misread.
    third = blocks(corpus, teacher_tok)
    with pytest.raises(DataError, match=r"built from other block texts .*another tokenisation of the corpus") as e:
        CrossTopKCache.build_or_load(tmp_path / "c", never, ensemble.members[0].logits, v_t, 1.0, key,
                                     text_fingerprint(third))
    assert "\n" not in str(e.value)


def test_blocks_cut_by_text_share_one_cache_across_student_vocabularies(world, tmp_path):
    """data.block_chars: the blocks' texts (and their split) come from the corpus alone, so a student with a wholly
    other vocabulary (another size, other merges) reads the cache built for the first, and its cached losses equal
    its live ones (k = V); a block whose tokens did not all fit keeps its text, which the teacher reads whole."""
    from tests.conftest import bpe_tokenizer

    corpus, ensemble, teacher_tok, student_tok, _ = world
    v_t = ensemble.members[0].model.get_output_embeddings().weight.shape[0]
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    second_tok = bpe_tokenizer(texts, 240)
    assert len(second_tok) != len(student_tok)

    def cut(tok):
        return build_lm_data("text_folder", None, str(corpus), None, None, tok, BLOCK, 0.1, 0.2, 0, None,
                             with_text=True, block_chars=300)

    first, second = cut(student_tok), cut(second_tok)
    assert first.train.texts == second.train.texts and first.test.texts == second.test.texts
    assert first.truncated > 0  # the 120-token student cuts most 300-character blocks short: the texts stay whole
    assert text_fingerprint(first.train) == text_fingerprint(second.train)
    # The teacher's tokens come from the texts alone: equal for both students, its eos where a document ends, also
    # in a block whose student tokens were cut short before their own eos.
    t_first, t_second = (teacher_tokens(teacher_tok, d.train, 128) for d in (first, second))
    assert torch.equal(t_first.ids, t_second.ids) and torch.equal(t_first.offsets, t_second.offsets)
    d = first.train
    cut_ends = [i for i in range(len(d)) if d.text_ends[i] and d.eos_id not in d.ids[i, :int(d.lengths[i])].tolist()]
    assert cut_ends, "expected a document's last block cut short before its eos"
    i = cut_ends[0]
    assert t_first.ids[i, int(t_first.lengths[i]) - 1] == teacher_tok.eos_token_id
    said: list[str] = []
    build(tmp_path / "c", ensemble, teacher_tok, first.train, k=v_t, log=said.append)

    def never():
        raise AssertionError("the cache was rebuilt")

    key = cross_cache_key(ensemble.fingerprint(), teacher_tok, 128, False)
    said.clear()
    cache = CrossTopKCache.build_or_load(tmp_path / "c", never, ensemble.members[0].logits, v_t, 1.0, key,
                                         text_fingerprint(second.train), log=said.append)
    assert said and said[0].startswith("teacher cache across tokenizers: reading")
    data = second.train
    batch = data.collate([data[i] for i in range(8)])
    t_live = CrossTeacher(ensemble, teacher_tok, second_tok, data, 128)(batch)
    t_cached = CachedCrossTeacher(cache, data)(batch)
    student = ModelOutputs(logits=student_logits(batch, len(second_tok)))
    for loss in (hybrid("forward", 1.0, teacher_tok, second_tok),
                 build_loss([("uld", 1.0, {"temperature": 1.0})]).parts[0]):
        torch.testing.assert_close(loss(student, t_cached, batch), loss(student, t_live, batch), rtol=1e-3,
                                   atol=1e-5)


def test_refusals_name_what_differs_in_one_line(world, tmp_path):
    corpus, ensemble, teacher_tok, student_tok, data = world
    cache = build(tmp_path / "c", ensemble, teacher_tok, data, k=4)
    key, data_fp = cache.manifest["teacher"], cache.manifest["data"]
    cases = [
        (dict(teacher_fingerprint=key + "x"), "built from another teacher or teacher tokenizer"),
        (dict(teacher_fingerprint=cross_cache_key(ensemble.fingerprint(), student_tok, 128, False)),
         "built from another teacher or teacher tokenizer"),
        (dict(k=8), "built with k=4, expected k=8"),
        (dict(temperature=2.0), "built at kd temperature 1.0, expected 2"),
    ]
    for kwargs, match in cases:
        with pytest.raises(DataError, match=match) as e:
            CrossTopKCache.load(tmp_path / "c", **{"teacher_fingerprint": key, "data_fingerprint": data_fp,
                                                   "k": 4, "temperature": 1.0, **kwargs})
        assert "\n" not in str(e.value)
    # A cut token file, then a cut top-k shard: refused when opened.
    tokens = tmp_path / "c" / "tokens.logprob.npy"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"tokens.logprob.npy has \d+ bytes, the manifest says \d+") as e:
        CrossTopKCache.load(tmp_path / "c", key, data_fp, 4, 1.0)
    assert "\n" not in str(e.value)
    said: list[str] = []
    rebuilt = build(tmp_path / "c", ensemble, teacher_tok, data, k=4, log=said.append)  # damaged: rebuilt
    assert any("rebuilding" in s for s in said) and len(rebuilt) == len(data)
    shard = next((tmp_path / "c" / "topk").glob("shard_*.logprobs.npy"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated or altered"):
        CrossTopKCache.load(tmp_path / "c", key, data_fp, 4, 1.0)
    (tmp_path / "c" / "cross.json").unlink()
    with pytest.raises(DataError, match=r"no cross.json \(not built, or its build did not finish\)"):
        CrossTopKCache.load(tmp_path / "c")


def test_span_likelihood_without_logits_or_token_logprobs_is_refused(world, tmp_path):
    corpus, ensemble, teacher_tok, student_tok, data = world
    cache = build(tmp_path / "c", ensemble, teacher_tok, data, k=4)
    batch = data.collate([data[i] for i in range(4)])
    out = CachedCrossTeacher(cache, data)(batch)
    bare = ModelOutputs(logits=None, sparse=out.sparse, alignment=out.alignment)
    with pytest.raises(ValueError, match=r"span_likelihood: the teacher gave neither logits nor its tokens' log-probs"):
        SpanLikelihood()(ModelOutputs(logits=student_logits(batch, len(student_tok))), bare, batch)
