"""Consistent teaching: the teacher sees exactly the student's augmented input; stored views replay exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.config import load_config
from kdkit.data import TeacherCache, TensorData, collate
from kdkit.data.augment import Augment, uniform
from kdkit.engine import TrainOptions, train
from kdkit.errors import ConfigError
from kdkit.losses import build_loss
from kdkit.teachers import Teacher
from kdkit.types import Batch, ModelOutputs


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _teacher():
    torch.manual_seed(0)
    return Teacher(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))


def test_views_are_pure_functions_of_seed_index_and_view():
    idx = np.arange(100)
    a, b = uniform(0, idx, np.zeros(100), 1), uniform(0, idx, np.zeros(100), 1)
    assert np.array_equal(a, b) and 0 <= a.min() and a.max() < 1
    assert not np.array_equal(a, uniform(0, idx, np.ones(100), 1))
    assert not np.array_equal(a, uniform(1, idx, np.zeros(100), 1))
    assert abs(a.mean() - 0.5) < 0.1
    aug = Augment(crop_padding=2, hflip=True, noise_std=0.1)
    x = torch.randn(4, 1, 6, 6)
    index, view = torch.tensor([3, 9, 3, 9]), torch.tensor([0, 0, 1, 1])
    out = aug.view(x[[0, 1, 0, 1]], index, view)
    again = aug.view(x[[0, 1, 0, 1]], index, view)
    assert torch.equal(out, again) and out.shape == x.shape
    assert not torch.equal(out[0], out[2])  # another view of the same example differs


def test_translation_moves_pixels_and_pads_with_zeros():
    aug = Augment(crop_padding=1)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = [aug.view(x, torch.tensor([i]), torch.tensor([0]))[0, 0] for i in range(30)]
    assert any(not torch.equal(s, x[0, 0]) for s in shifted)
    for s in shifted:  # each is the original moved by at most one pixel, zeros filling in
        found = any(
            torch.equal(s, F.pad(x, (1, 1, 1, 1))[0, 0, dy : dy + 4, dx : dx + 4]) for dy in range(3) for dx in range(3)
        )
        assert found


def test_teacher_and_student_receive_identical_augmented_batches():
    data, teacher = _images(), _teacher()
    seen_teacher, seen_student = [], []

    def teacher_fn(batch):
        seen_teacher.append(batch.inputs.clone())
        return teacher(batch.inputs)

    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    student.register_forward_pre_hook(lambda m, args: seen_student.append(args[0].clone()))
    aug = Augment(crop_padding=1, hflip=True, noise_std=0.05, mixup_alpha=0.4)
    train(
        student,
        build_loss([("ce", 0.5, {}), ("soft_kl", 0.5, {})]),
        data,
        TrainOptions(epochs=2, batch_size=8, keep_best="none"),
        teacher=teacher_fn,
        device="cpu",
        progress=False,
        augment=aug,
    )
    assert len(seen_teacher) == len(seen_student) == 8
    for t, s in zip(seen_teacher, seen_student):
        assert torch.equal(t, s)
    originals = torch.cat([data.x[i : i + 8] for i in range(0, 32, 8)])
    assert not any(torch.equal(t, originals[: len(t)]) for t in seen_teacher)  # really augmented


def test_stored_views_replay_to_the_online_teacher_outputs(tmp_path):
    data, teacher = _images(), _teacher()
    aug = Augment(crop_padding=2, hflip=True)
    cache = TeacherCache.build_or_load(
        data, teacher.logits, teacher.fingerprint(), tmp_path, batch_size=5, log=lambda m: None, augment=aug, views=4
    )
    assert cache.views == 4 and cache.logits.shape == (32, 4, 3)
    batch = collate([data[i] for i in range(12)])
    for epoch in range(3):
        augmented = aug.apply(batch, seed=1, epoch=epoch, views=4)
        assert augmented.view.min() >= 0 and augmented.view.max() < 4
        torch.testing.assert_close(cache(augmented).logits, teacher(augmented.inputs).logits, atol=1e-6, rtol=0)
    plain = TeacherCache.build_or_load(
        data, teacher.logits, teacher.fingerprint(), tmp_path, batch_size=5, log=lambda m: None
    )
    assert plain.path != cache.path and plain.views == 0


def test_mixup_cross_entropy_mixes_the_labels():
    logits = torch.randn(4, 3)
    y, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    batch = Batch(torch.zeros(4, 2), y, torch.arange(4), mixed_labels=y2, mix_lambda=0.3)
    loss = build_loss([("ce", 1.0, {})])(ModelOutputs(logits), None, batch).loss
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y2)
    torch.testing.assert_close(loss, expected)


BASE = {"teacher": {"members": [{"model": {"name": "mlp"}}]}, "student": {"model": {"name": "mlp"}}}


def test_cache_and_augmentation_rules_in_the_config():
    with pytest.raises(ConfigError, match="distill.cache_views: train.augment is on"):
        load_config(BASE, ["distill.cache_teacher=true", "train.augment.crop_padding=2"])
    with pytest.raises(ConfigError, match="a mixed input .* has no cached teacher output"):
        load_config(BASE, ["distill.cache_teacher=true", "train.augment.mixup_alpha=0.2"])
    ok = load_config(BASE, ["distill.cache_teacher=true", "train.augment.crop_padding=2", "distill.cache_views=4"])
    assert ok.distill.cache_views == 4


def test_image_only_augmentation_on_a_table_is_refused(tmp_path, monkeypatch):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", x=rng.normal(size=(60, 4)).astype(np.float32), y=rng.integers(0, 2, 60))
    cfg = load_config(
        {**BASE, "data": {"source": "arrays", "path": str(tmp_path / "t.npz")}, "run": {"progress": False}},
        ["train.augment.hflip=true", "teacher.train.epochs=1"],
    )
    with pytest.raises(ConfigError, match=r"train\.augment\.hflip: needs image inputs \(C, H, W\); .*\(4,\)"):
        distill(cfg, out=tmp_path / "run", log=lambda m: None)


def _crash_at_step(n: int):
    """A transform (called before every micro-batch's forward) that crashes once `n` optimizer steps are done."""

    def transform(batch, student, step):
        if step == n:
            raise RuntimeError(f"simulated crash after step {n}")
        return batch

    return transform


def test_resume_with_augmentation_equals_uninterrupted(tmp_path):
    data, teacher = _images(n=40), _teacher()
    aug = Augment(crop_padding=1, noise_std=0.05, mixup_alpha=0.4)
    opts = TrainOptions(epochs=3, batch_size=8, keep_best="none", checkpoint_every_steps=3, checkpoint_every_minutes=0)
    loss = build_loss([("ce", 0.5, {}), ("soft_kl", 0.5, {})])

    def student():
        torch.manual_seed(5)
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))

    full = student()
    kw = dict(teacher=lambda b: teacher(b.inputs), device="cpu", progress=False, augment=aug, seed=2)
    train(full, loss, data, opts, ckpt_dir=tmp_path / "a", **kw)
    part = student()
    with pytest.raises(RuntimeError, match="simulated crash"):  # after step 7; the last checkpoint is step 6
        train(part, loss, data, opts, ckpt_dir=tmp_path / "b", transform=_crash_at_step(7), **kw)
    from kdkit.engine.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "b").name == "step_00000006"
    resumed = student()
    train(resumed, loss, data, opts, ckpt_dir=tmp_path / "b", resume=True, **kw)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
