"""The offline top-k teacher cache (kdkit.data.lm_cache): what it stores, how it is refused, what it costs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.data.lm_cache import MANIFEST, TopKCache, fingerprint_blocks, topk_logprobs
from kdkit.errors import DataError
from kdkit.losses import token_functional as Ft
from kdkit.losses.token_kl import TokenKL
from kdkit.types import Batch, ModelOutputs

V, T, N = 37, 8, 5


class TinyLM(nn.Module):
    """A causal toy LM: embedding, causal running mean over positions, linear head → (B, T, V)."""

    def __init__(self, v: int = V, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(v, width)
        self.head = nn.Linear(width, v)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return 3.0 * self.head(torch.tanh(h))


def _blocks(n: int = N, seed: int = 0, v: int = V):
    """Token blocks as dicts; block 1 is right-padded to a valid length of 5."""
    g = torch.Generator().manual_seed(seed)
    blocks = [{"input_ids": torch.randint(0, v, (T,), generator=g)} for _ in range(n)]
    blocks[1]["input_ids"][5:] = 0
    blocks[1]["attention_mask"] = (torch.arange(T) < 5).long()
    return blocks


def _build(tmp_path, teacher=None, blocks=None, k=4, temperature=2.0, fp="teacher-a", **kw):
    teacher = teacher or TinyLM()
    blocks = blocks if blocks is not None else _blocks()
    kw.setdefault("log", lambda m: None)
    return TopKCache.build(tmp_path / "cache", blocks, teacher, k, temperature, fp, batch_size=2, shard_size=2, **kw)


def _batch(index, blocks):
    ids = torch.stack([blocks[i]["input_ids"] for i in index])
    labels = ids.clone()
    if 1 in index:
        labels[list(index).index(1), 5:] = -100
    return Batch(inputs=ids, labels=labels, index=torch.tensor(index))


def test_round_trip_equals_topk_of_the_teachers_log_softmax(tmp_path):
    teacher, blocks = TinyLM(), _blocks()
    cache = _build(tmp_path, teacher, blocks)
    index = [3, 0, 4, 1]
    out = cache(_batch(index, blocks))
    assert out.logits is None
    sp = out.sparse
    assert sp.ids.dtype == torch.int64 and sp.logprobs.dtype == torch.float32 and sp.rest.dtype == torch.float32
    assert tuple(sp.ids.shape) == (4, T, 4) and tuple(sp.rest.shape) == (4, T)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(torch.stack([blocks[i]["input_ids"] for i in index])).double() / 2.0, -1)
    lp, ids = log_p.topk(4, dim=-1)
    rest = torch.log1p(-lp.exp().sum(-1))
    real = torch.ones(4, T, dtype=torch.bool)
    real[3, 5:] = False  # block 1 (4th in this batch) is padded after 5 tokens
    assert torch.equal(sp.ids[real], ids[real])
    torch.testing.assert_close(sp.logprobs[real].double(), lp[real], atol=1e-6, rtol=2**-11)  # fp16: 11 bits
    assert sp.logprobs.half().float().equal(sp.logprobs)  # what is stored is float16
    torch.testing.assert_close(sp.rest[real].double(), rest[real], atol=1e-6, rtol=1e-6)
    # padding holds the placeholder: all the mass in the rest bucket
    assert torch.isneginf(sp.logprobs[3, 5:]).all() and (sp.rest[3, 5:] == 0).all()
    assert cache.tokens == N * T - (T - 5)
    assert len(cache) == N and cache.k == 4 and cache.temperature == 2.0 and cache.vocab_size == V


def test_topk_logprobs_rest_is_stable_when_the_top_k_hold_nearly_everything():
    logits = torch.tensor([[40.0, 39.0, 0.0, -1.0, -2.0]])  # the tail holds ~e^-40 of the mass
    sp = topk_logprobs(logits, 2)
    want = torch.logsumexp(torch.log_softmax(logits.double(), -1)[:, 2:], -1)
    assert math.isfinite(sp.rest.item())
    torch.testing.assert_close(sp.rest.double(), want, atol=0, rtol=1e-6)  # log1p(−Σp) would give −inf here
    assert torch.isneginf(topk_logprobs(logits, 5).rest).all()


def test_lookup_follows_the_batch_index_across_shards(tmp_path):
    blocks = _blocks()
    cache = _build(tmp_path, blocks=blocks)
    assert len(json.loads((cache.path / MANIFEST).read_text())["shards"]) == 3  # 5 examples, 2 per shard
    whole = cache.lookup([4, 2, 0, 3])
    for row, i in enumerate([4, 2, 0, 3]):
        one = cache.lookup([i])
        assert torch.equal(whole.ids[row], one.ids[0]) and torch.equal(whole.logprobs[row], one.logprobs[0])
    assert not torch.equal(whole.ids[0], whole.ids[1])
    with pytest.raises(DataError, match="example 5 is not in it"):
        cache.lookup([0, 5])
    # a batch padded to fewer positions gets the first ones; more than T is refused
    short = Batch(inputs=torch.zeros(2, 6, dtype=torch.long), labels=torch.zeros(2, 6), index=torch.tensor([2, 0]))
    assert torch.equal(cache(short).sparse.ids, whole.ids[[1, 2], :6])
    long = Batch(inputs=torch.zeros(1, T + 1, dtype=torch.long), labels=torch.zeros(1, T + 1), index=torch.tensor([0]))
    with pytest.raises(DataError, match=f"stores {T}"):
        cache(long)


def test_a_cache_of_another_teacher_data_k_or_temperature_is_refused(tmp_path):
    blocks = _blocks()
    cache = _build(tmp_path, blocks=blocks)
    data_fp = fingerprint_blocks(blocks)
    path = cache.path
    TopKCache.load(path, "teacher-a", data_fp, 4, 2.0)  # the matching one opens
    with pytest.raises(DataError, match="built from another teacher") as exc:
        TopKCache.load(path, "teacher-b", data_fp, 4, 2.0)
    assert "\n" not in str(exc.value) and "teacher-b" in str(exc.value)
    other = _blocks(seed=1)
    with pytest.raises(DataError, match="built from another data set"):
        TopKCache.load(path, "teacher-a", fingerprint_blocks(other), 4, 2.0)
    with pytest.raises(DataError, match="k=4, expected k=8"):
        TopKCache.load(path, "teacher-a", data_fp, 8, 2.0)
    with pytest.raises(DataError, match="temperature 2.0, expected 1"):
        TopKCache.load(path, "teacher-a", data_fp, 4, 1.0)
    # build_or_load refuses too, unless told to overwrite
    with pytest.raises(DataError, match="built from another teacher"):
        TopKCache.build_or_load(path, blocks, TinyLM(seed=1), 4, 2.0, "teacher-b", log=lambda m: None)
    rebuilt = TopKCache.build_or_load(path, blocks, TinyLM(seed=1), 4, 2.0, "teacher-b", overwrite=True, log=print)
    assert rebuilt.manifest["teacher"] == "teacher-b"
    assert not torch.equal(rebuilt.lookup([0]).ids, cache.lookup([0]).ids)  # really the other teacher's outputs


def test_build_or_load_reuses_a_matching_cache_without_running_the_teacher(tmp_path):
    blocks = _blocks()
    _build(tmp_path, blocks=blocks)

    def no_teacher(ids):
        raise AssertionError("the teacher ran although the cache matched")

    logs = []
    cache = TopKCache.build_or_load(
        tmp_path / "cache", blocks, no_teacher, 4, 2.0, "teacher-a", verify=True, log=logs.append
    )
    assert len(cache) == N and any("reading" in m for m in logs)


def test_a_truncated_or_altered_shard_is_detected(tmp_path):
    blocks = _blocks()
    cache = _build(tmp_path, blocks=blocks)
    shard = cache.path / "shard_00001.logprobs.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="shard 1 file shard_00001.logprobs.npy has .* bytes.*truncated"):
        TopKCache.load(cache.path)
    altered = bytearray(data)
    altered[-3] ^= 0xFF
    shard.write_bytes(bytes(altered))
    TopKCache.load(cache.path)  # same size: only the full hash can tell
    with pytest.raises(DataError, match="altered"):
        TopKCache.load(cache.path, verify=True)
    # build_or_load rebuilds a damaged cache (the teacher is at hand), and says so
    logs = []
    fixed = TopKCache.build_or_load(
        cache.path, blocks, TinyLM(), 4, 2.0, "teacher-a", verify=True, log=logs.append, batch_size=2, shard_size=2
    )
    assert any("altered" in m and "rebuilding" in m for m in logs)
    assert shard.read_bytes() == data
    TopKCache.load(fixed.path, verify=True)


def test_an_interrupted_build_leaves_no_cache(tmp_path):
    calls = []

    def failing(ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return TinyLM()(ids)

    with pytest.raises(RuntimeError):
        _build(tmp_path, teacher=failing)
    with pytest.raises(DataError, match="no manifest.json"):
        TopKCache.load(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_bytes_per_token_at_k64_and_the_smollm2_vocabulary(tmp_path):
    v = 49152
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, v, (16,), generator=g) for _ in range(4)]

    def teacher(ids):
        return torch.randn(ids.shape[0], ids.shape[1], v, generator=g)

    logs = []
    cache = TopKCache.build(
        tmp_path / "c", blocks, teacher, 64, 1.0, "smol", batch_size=1, log=logs.append, log_every_s=0.0
    )
    assert cache.manifest["dtypes"] == {"ids": "uint16", "logprobs": "float16", "rest": "float32"}
    assert cache.tokens == 64
    assert cache.bytes_per_token <= 300, cache.bytes_per_token
    headers = cache.size_bytes - 64 * (64 * 4 + 4)
    assert 0 < headers < 3 * 256  # the rest is .npy headers, one per file
    assert cache.size_bytes == sum(f.stat().st_size for f in (tmp_path / "c").glob("shard_*.npy"))
    assert any("ETA" in m for m in logs) and any("bytes/token" in m for m in logs)
    assert int(cache.lookup([3]).ids.max()) < v


def test_large_vocabularies_store_int32_ids(tmp_path):
    v = 70000
    blocks = [torch.tensor([1, 2, 3])]
    logits = torch.zeros(1, 3, v)
    logits[..., 69999] = 5.0

    cache = TopKCache.build(tmp_path / "c", blocks, lambda ids: logits, 2, 1.0, "big", log=lambda m: None)
    assert cache.manifest["dtypes"]["ids"] == "int32"
    assert (cache.lookup([0]).ids[..., 0] == 69999).all()


def test_bad_blocks_and_settings_fail_clearly(tmp_path):
    blocks = _blocks()
    blocks[3] = {"input_ids": torch.zeros(T - 1, dtype=torch.long)}
    with pytest.raises(DataError, match="block 3 has 7 tokens"):
        _build(tmp_path, blocks=blocks)
    with pytest.raises(DataError, match="exceeds the teacher's vocabulary of 37"):
        _build(tmp_path, k=38)
    with pytest.raises(DataError, match="empty"):
        _build(tmp_path, blocks=[])
    with pytest.raises(DataError, match=r"logits of shape \(2, 8\)"):
        _build(tmp_path, teacher=lambda ids: torch.zeros(ids.shape))


def test_the_data_fingerprint_sees_every_token_and_length():
    blocks = _blocks()
    fp = fingerprint_blocks(blocks)
    assert fingerprint_blocks(_blocks()) == fp
    changed = copy.deepcopy(blocks)
    changed[4]["input_ids"][7] = (changed[4]["input_ids"][7] + 1) % V
    assert fingerprint_blocks(changed) != fp
    assert fingerprint_blocks(blocks, lengths=[T, 4, T, T, T]) != fp


def test_a_training_step_from_the_cache_equals_the_dense_teacher_at_k_equal_v(tmp_path):
    """k = V keeps the whole distribution: the step differs from the dense one only by float16 storage."""
    teacher, blocks = TinyLM(seed=0), _blocks()
    cache = _build(tmp_path, teacher, blocks, k=V, temperature=2.0)
    student_a = TinyLM(seed=3)
    student_b = copy.deepcopy(student_a)
    loss = TokenKL(temperature=2.0)
    batch = _batch([2, 1, 4], blocks)
    losses = []
    for student, source in ((student_a, "dense"), (student_b, "cache")):
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        with torch.no_grad():
            t_out = ModelOutputs(teacher(batch.inputs)) if source == "dense" else cache(batch)
        value = loss(ModelOutputs(student(batch.inputs)), t_out, batch)
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[0] > 0.05
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)
    for pa, pb in zip(student_a.parameters(), student_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-4, rtol=0)
    # and the sparse loss at k < V is the top-k one, below the dense value
    small = _build(tmp_path / "small", teacher, blocks, k=3, temperature=2.0)
    with torch.no_grad():
        s_out = ModelOutputs(student_a(batch.inputs))
        dense = loss(s_out, ModelOutputs(teacher(batch.inputs)), batch).item()
        sparse = loss(s_out, small(batch), batch).item()
        err = Ft.topk_kl_error(s_out.logits, teacher(batch.inputs), small(batch).sparse, batch.labels, 2.0)
    assert 0 < sparse < dense
    assert err["dense_kl"] == pytest.approx(dense, rel=1e-5)
    assert err["sparse_kl"] == pytest.approx(sparse, rel=2e-3)


def test_manifest_records_how_it_was_made(tmp_path):
    cache = _build(tmp_path)
    m = json.loads((cache.path / MANIFEST).read_text())
    assert m["teacher"] == "teacher-a" and m["data"].startswith("tokens:5:")
    assert (m["k"], m["temperature"], m["vocab_size"], m["seq_len"], m["examples"]) == (4, 2.0, V, T, N)
    for shard in m["shards"]:
        for name in ("ids", "logprobs", "rest"):
            f = cache.path / shard[name]["file"]
            assert f.stat().st_size == shard[name]["bytes"]
            assert np.load(f, mmap_mode="r").shape[0] == shard["examples"]
    assert m["bytes_per_token"] == pytest.approx(cache.bytes_per_token, abs=1e-3)


def test_topk_logprobs_rest_survives_a_tail_too_small_for_exp():
    logits = torch.tensor([[0.0, -50.0, -200.0, -210.0], [1.0, 2.0, 3.0, 4.0]])  # row 0: exp(−200) underflows
    sp = topk_logprobs(logits, 2)
    log_p = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(sp.rest[0].double(), torch.logsumexp(log_p[0, 2:], -1), atol=0, rtol=1e-6)
    torch.testing.assert_close(sp.rest[1].double(), torch.logsumexp(log_p[1, :2], -1), atol=0, rtol=1e-6)
    torch.testing.assert_close(sp.logprobs.double(), log_p.topk(2, -1).values, atol=1e-6, rtol=0)
    assert torch.equal(sp.ids, torch.tensor([[0, 1], [3, 2]]))
