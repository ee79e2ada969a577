"""How the top-k cache is built fast (kdkit issue #17): the grouped top-k and exp2 sums equal the reference formula,
the background shard writer keeps writes atomic and surfaces their errors, and a one-member teacher ensemble may
be skipped for the cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.data import lm_cache
from kdkit.data.lm_cache import BUILD_STAGES, GROUP, MANIFEST, TopKCache, topk_logprobs
from kdkit.errors import DataError
from kdkit.teachers.ensemble import TeacherEnsemble
from kdkit.teachers.teacher import Teacher

V, T = 1003, 12  # V: 125 groups of 8 and 3 ids left over; k = 8 takes the grouped path (125 ≥ 4k)


def reference(logits: torch.Tensor, k: int, temperature: float):
    """The cache's formula in float64: top-k of log_softmax(z / T) and log Σ p over the other ids."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    top, ids = log_p.topk(k, -1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top, rest


def old_topk_logprobs(logits: torch.Tensor, k: int, temperature: float):
    """The implementation before issue #17 (full top-k of z / T, one exp pass, float64 fallback), verbatim."""
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    z = flat.float() / float(temperature)
    z_max = z.amax(-1, keepdim=True)
    e = (z - z_max).exp_()
    log_z = e.sum(-1, keepdim=True).log_() + z_max
    top, top_ids = z.topk(k, dim=-1)
    rest = e.scatter_(-1, top_ids, 0.0).sum(-1).log_() + (z_max - log_z).squeeze(-1)
    under = torch.isneginf(rest)
    if k < v and under.any():
        log_p = z[under] - log_z[under]
        rest[under] = log_p.scatter_(-1, top_ids[under], float("-inf")).logsumexp(-1)
    lead = logits.shape[:-1]
    return top_ids.reshape(*lead, k), (top - log_z).reshape(*lead, k), rest.reshape(lead)


def random_logits(seed: int = 0, b: int = 3, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, T, V, generator=g) * scale


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_topk_logprobs_equals_the_reference_and_the_old_formula(temperature):
    logits = random_logits()
    logits[0, 0] *= 12.0  # a peaked row: the tail holds < 1e-30 of the mass
    logits[0, 1] = -300.0 - 0.01 * torch.arange(V)  # the tail far below exp's float32 range, even at T = 2.5
    logits[0, 1, :2] = torch.tensor([60.0, 59.0])
    sp = topk_logprobs(logits, 8, temperature, rows_per_chunk=5)  # chunks that do not divide the 36 rows
    ids, top, rest = reference(logits, 8, temperature)
    assert torch.equal(sp.ids, ids)
    torch.testing.assert_close(sp.logprobs.double(), top, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(sp.rest.double(), rest, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(sp.rest).all() and (sp.rest <= 0).all()
    old_ids, old_top, old_rest = old_topk_logprobs(logits, 8, temperature)
    assert torch.equal(sp.ids, old_ids)
    torch.testing.assert_close(sp.logprobs, old_top, atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(sp.rest, old_rest, atol=2e-5, rtol=1e-5)


def test_the_grouped_top_k_finds_values_that_share_a_group_or_sit_in_the_leftover_ids():
    logits = random_logits(seed=1, b=1)[0]  # (T, V)
    w = V // GROUP
    logits[0, [5 + s * w for s in range(GROUP)]] = 20.0 + torch.arange(GROUP).float()  # one whole group on top
    logits[1, GROUP * w :] = 30.0 + torch.arange(V - GROUP * w).float()  # the leftover ids on top
    logits[2, 7 : 7 + 2 * w : w] = 50.0  # two tied values in one group
    sp = topk_logprobs(logits, 8, 1.0)
    ids, top, _ = reference(logits, 8, 1.0)
    assert set(sp.ids[0].tolist()) == {5 + s * w for s in range(GROUP)}
    assert set(sp.ids[1, :3].tolist()) == set(range(GROUP * w, V))
    assert set(sp.ids[2, :2].tolist()) == {7, 7 + w}
    torch.testing.assert_close(sp.logprobs.double(), top, atol=2e-5, rtol=1e-6)
    assert torch.equal(sp.ids[3:], ids[3:])


def test_k_equal_v_and_small_vocabularies_keep_their_meaning():
    logits = random_logits(seed=2, b=1)[..., :40]  # 5 groups: too few for the grouped path
    sp = topk_logprobs(logits, 40, 2.0)
    ids, top, _ = reference(logits, 40, 2.0)
    assert torch.equal(sp.ids, ids) and torch.isneginf(sp.rest).all()
    torch.testing.assert_close(sp.logprobs.double(), top, atol=2e-5, rtol=1e-6)


class RandomLM(nn.Module):
    """(B, T) ids → (B, T, V) logits that depend on every id so far (a causal running mean), V = 1003."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, 24)
        self.head = nn.Linear(24, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return 6.0 * self.head(torch.tanh(h))


def padded_blocks(n: int = 7):
    g = torch.Generator().manual_seed(3)
    blocks = [{"input_ids": torch.randint(0, V, (T,), generator=g)} for _ in range(n)]
    for i, length in ((1, 5), (4, 1), (6, 9)):
        blocks[i]["input_ids"][length:] = 0
        blocks[i]["attention_mask"] = (torch.arange(T) < length).long()
    return blocks


def test_the_built_cache_holds_the_reference_formula_and_padding_placeholders(tmp_path):
    teacher, blocks = RandomLM(), padded_blocks()
    timings, logs = {}, []
    cache = TopKCache.build(
        tmp_path / "c", blocks, teacher, 8, 1.7, "t", batch_size=3, shard_size=2, log=logs.append, timings=timings
    )
    stored = cache.lookup(list(range(len(blocks))))
    with torch.no_grad():
        ids, top, rest = reference(teacher(torch.stack([b["input_ids"] for b in blocks])), 8, 1.7)
    lengths = [int(b.get("attention_mask", torch.ones(T)).sum()) for b in blocks]
    real = torch.arange(T).view(1, -1) < torch.tensor(lengths).view(-1, 1)
    assert torch.equal(stored.ids[real], ids[real])
    torch.testing.assert_close(stored.logprobs[real].double(), top[real], atol=1e-5, rtol=2**-11)  # float16
    torch.testing.assert_close(stored.rest[real].double(), rest[real], atol=2e-5, rtol=1e-5)
    assert torch.equal(stored.ids[~real], torch.arange(8).expand(int((~real).sum()), 8))
    assert torch.isneginf(stored.logprobs[~real]).all() and (stored.rest[~real] == 0).all()
    assert cache.tokens == sum(lengths) and len(cache.manifest["shards"]) == 4
    assert set(timings) == set(BUILD_STAGES) and timings["teacher"] > 0 and timings["write_background"] > 0
    assert "teacher" in logs[-1] and "writer thread" in logs[-1]


def test_shards_are_written_by_the_background_thread_and_its_errors_surface(tmp_path, monkeypatch):
    writers, real_save = [], lm_cache.save_npy

    def save(path, array):
        writers.append(threading.current_thread().name)
        if len(writers) == 5:  # the second shard's logprobs file
            raise OSError("No space left on device")
        real_save(path, array)

    monkeypatch.setattr(lm_cache, "save_npy", save)
    with pytest.raises(OSError, match="No space left"):
        TopKCache.build(
            tmp_path / "c", padded_blocks(), RandomLM(), 8, 1.0, "t", batch_size=1, shard_size=2, log=lambda m: None
        )
    assert writers and all(name.startswith("kdkit-topk-cache-writer") for name in writers)
    assert not (tmp_path / "c" / MANIFEST).exists() and not list((tmp_path / "c").glob("*.tmp"))
    assert not [t for t in threading.enumerate() if t.name.startswith("kdkit-topk-cache-writer")]
    with pytest.raises(DataError, match="no manifest.json"):
        TopKCache.load(tmp_path / "c")


def test_a_teacher_failure_while_a_shard_is_being_written_leaves_no_temp_file(tmp_path, monkeypatch):
    started, release, real_save = threading.Event(), threading.Event(), lm_cache.save_npy

    def slow_save(path, array):
        started.set()
        release.wait(5)  # the write is still running when the teacher fails
        real_save(path, array)

    calls = []

    def teacher(ids):
        calls.append(1)
        if len(calls) == 3:
            assert started.wait(5)
            threading.Timer(0.2, release.set).start()
            raise RuntimeError("teacher crashed")
        return RandomLM()(ids)

    monkeypatch.setattr(lm_cache, "save_npy", slow_save)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        TopKCache.build(
            tmp_path / "c", padded_blocks(), teacher, 8, 1.0, "t", batch_size=1, shard_size=2, log=lambda m: None
        )
    assert release.is_set()  # build waited for the write in flight before raising
    assert not list((tmp_path / "c").glob("*.tmp")) and not (tmp_path / "c" / MANIFEST).exists()
    assert sorted(f.name for f in (tmp_path / "c").glob("shard_*.npy")) == [
        f"shard_00000.{name}.npy" for name in sorted(lm_cache.ARRAYS)
    ]


def test_a_one_member_ensemble_and_its_member_give_the_same_cache_entries():
    """causal_lm builds the cache from the member alone: the ensemble's combine="probs" logits are log_softmax of
    the member's, a per-position shift that top-k log-probs at any temperature do not see."""
    member = Teacher(RandomLM(seed=5))
    ids = padded_blocks()[0]["input_ids"].view(1, -1)
    for combine in ("probs", "logits"):
        ensemble = TeacherEnsemble([member], [1.0], combine)
        for temperature in (1.0, 2.5):
            a = topk_logprobs(ensemble.logits(ids), 8, temperature)
            b = topk_logprobs(member.logits(ids), 8, temperature)
            assert torch.equal(a.ids, b.ids)
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=1e-6)
            torch.testing.assert_close(a.rest, b.rest, atol=2e-5, rtol=1e-5)
    assert np.isfinite(b.rest.numpy()).all()
