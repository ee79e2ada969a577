"""The teacher-output cache gives the same loss as the online teacher, and is never reused for another teacher or
other data."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from kdkit.data import TeacherCache, TensorData, collate
from kdkit.engine import TrainOptions, train
from kdkit.losses import build_loss
from kdkit.teachers import Teacher, TeacherEnsemble
from kdkit.types import ModelOutputs


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g))


def _teacher(seed=0):
    torch.manual_seed(seed)
    return Teacher(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4)))


def _build(data, teacher, folder, logs=None):
    return TeacherCache.build_or_load(
        data,
        teacher.logits,
        teacher.fingerprint(),
        folder,
        batch_size=7,
        log=(logs.append if logs is not None else lambda m: None),
    )


def test_cached_outputs_equal_online_and_give_the_same_loss(tmp_path):
    data, teacher = _data(), _teacher()
    cache = _build(data, teacher, tmp_path)
    batch = collate([data[i] for i in (5, 0, 31, 47)])
    online = teacher(batch.inputs)
    cached = cache(batch)
    torch.testing.assert_close(cached.logits, online.logits, atol=1e-6, rtol=0)
    loss = build_loss([("soft_kl", 1.0, {"temperature": 3.0})])
    student = ModelOutputs(torch.randn(4, 4))
    assert abs(loss(student, cached, batch).loss.item() - loss(student, online, batch).loss.item()) < 1e-6


def test_training_with_the_cache_equals_training_with_the_live_teacher(tmp_path):
    data, teacher = _data(), _teacher()
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    b = copy.deepcopy(a)
    loss = build_loss([("ce", 0.5, {}), ("soft_kl", 0.5, {})])
    opts = TrainOptions(epochs=2, batch_size=8, keep_best="none")
    train(a, loss, data, opts, teacher=lambda bt: teacher(bt.inputs), device="cpu", progress=False)
    train(b, loss, data, opts, teacher=_build(data, teacher, tmp_path), device="cpu", progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_cache_is_reused_for_the_same_teacher_and_data(tmp_path):
    data, teacher, logs = _data(), _teacher(), []
    _build(data, teacher, tmp_path, logs)
    _build(data, teacher, tmp_path, logs)
    assert "wrote" in logs[0] and "reusing" in logs[1]
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_a_changed_teacher_or_changed_data_gets_a_new_cache(tmp_path):
    data, teacher = _data(), _teacher()
    first = _build(data, teacher, tmp_path)
    with torch.no_grad():
        teacher.model[0].weight[0, 0] += 1e-3  # a tiny change to the weights
    second = _build(data, teacher, tmp_path)
    assert first.path != second.path
    changed = TensorData(data.x.clone(), data.labels.clone())
    changed.x[3, 2] += 1e-4
    third = _build(changed, teacher, tmp_path)
    assert third.path not in (first.path, second.path)
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_a_cache_whose_record_does_not_match_is_rebuilt_not_reused(tmp_path):
    data, teacher, logs = _data(), _teacher(), []
    cache = _build(data, teacher, tmp_path, logs)
    meta = cache.path.with_suffix(".json")
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "n": 999}))
    _build(data, teacher, tmp_path, logs)
    assert "rebuilding" in logs[1]


def test_ensemble_fingerprint_depends_on_members_weights_and_combine():
    t1, t2 = _teacher(0), _teacher(1)
    base = TeacherEnsemble([t1, t2]).fingerprint()
    assert TeacherEnsemble([t1, t2], [1, 2]).fingerprint() != base
    assert TeacherEnsemble([t1, t2], combine="logits").fingerprint() != base
    assert TeacherEnsemble([t2, t1]).fingerprint() != base
    assert TeacherEnsemble([t1, t2]).fingerprint() == base
