"""The engine against a plain reference loop: same weights; accumulation invariance; exact resume; NaN stop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.data import TensorData
from kdkit.engine import EpochShuffle, TrainOptions, train
from kdkit.engine.checkpoint import latest_checkpoint
from kdkit.errors import TrainingError
from kdkit.losses import Loss, WeightedLoss, build_loss
from kdkit.teachers import Teacher
from kdkit.types import ModelOutputs


def _data(n=64, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return TensorData(x, y)


def _mlp(d=6, c=3, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, c))


def _teacher(d=6, c=3):
    torch.manual_seed(7)
    return Teacher(nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, c)))


def crash_at_step(n: int):
    """A transform (called before every micro-batch's forward) that crashes once `n` optimizer steps are done."""

    def transform(batch, student, step):
        if step == n:
            raise RuntimeError(f"simulated crash after step {n}")
        return batch

    return transform


OPTS = dict(epochs=2, batch_size=16, optimizer="adamw", lr=1e-2, schedule="constant", keep_best="none")


def test_engine_equals_a_plain_reference_loop():
    data, teacher = _data(), _teacher()
    student = _mlp()
    reference = copy.deepcopy(student)
    loss = build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {"temperature": 4.0})])
    train(student, loss, data, TrainOptions(**OPTS), teacher=lambda b: teacher(b.inputs), device="cpu", progress=False)

    # The reference: plain torch, the same data order, the same math written out.
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    sampler = EpochShuffle(len(data), seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for i in range(0, len(order), 16):
            idx = torch.tensor(order[i : i + 16])
            x, y = data.x[idx], data.labels[idx]
            with torch.no_grad():
                t = teacher.model(x)
            s = reference(x)
            kd = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
            total = 0.1 * F.cross_entropy(s, y) + 0.9 * kd
            opt.zero_grad()
            total.backward()
            opt.step()
    for a, b in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_micro_batch_times_accumulation_is_invariant():
    data = _data()
    a, b = _mlp(), _mlp()
    loss = build_loss([("ce", 1.0, {})])
    train(a, loss, data, TrainOptions(**{**OPTS, "batch_size": 16, "grad_accum": 1}), device="cpu", progress=False)
    train(b, loss, data, TrainOptions(**{**OPTS, "batch_size": 8, "grad_accum": 2}), device="cpu", progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    changed = _mlp()
    assert any(not torch.allclose(p, q) for p, q in zip(a.parameters(), changed.parameters()))


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    data = _data(n=72)
    loss = build_loss([("ce", 1.0, {})])
    opts = TrainOptions(
        **{**OPTS, "epochs": 3, "checkpoint_every_steps": 3, "checkpoint_every_minutes": 0, "schedule": "cosine",
           "keep_best": "loss"}
    )  # fmt: skip

    def on_eval(model):  # deterministic validation on the training data
        with torch.no_grad():
            return {"loss": F.cross_entropy(model(data.x), data.labels).item()}

    full = _mlp(dropout=0.3)
    r_full = train(
        full, loss, data, opts, on_eval=on_eval, seed=3, device="cpu", ckpt_dir=tmp_path / "a", progress=False
    )

    part = _mlp(dropout=0.3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            part,
            loss,
            data,
            opts,
            on_eval=on_eval,
            seed=3,
            device="cpu",
            ckpt_dir=tmp_path / "b",
            progress=False,
            transform=crash_at_step(7),
        )  # 5 steps/epoch: crashes in step 8 (mid-epoch 2), last checkpoint at step 6
    assert latest_checkpoint(tmp_path / "b").name == "step_00000006"
    resumed = _mlp(dropout=0.3, seed=99)  # different init: everything must come from the checkpoint
    r2 = train(
        resumed,
        loss,
        data,
        opts,
        on_eval=on_eval,
        seed=3,
        device="cpu",
        ckpt_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert r2.steps == r_full.steps == 15
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    assert r2.best_epoch == r_full.best_epoch
    assert [h for h in r2.history if "val/loss" in h] == [h for h in r_full.history if "val/loss" in h]


class _NaNAfter(Loss):
    name = "nan_after"
    needs_teacher = False

    def __init__(self, after: int):
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, student: ModelOutputs, teacher, batch):
        self.calls += 1
        value = F.cross_entropy(student.logits, batch.labels)
        return value * float("nan") if self.calls > self.after else value


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = _data()
    model = _mlp()
    opts = TrainOptions(**{**OPTS, "checkpoint_every_steps": 2, "checkpoint_every_minutes": 0})
    with pytest.raises(TrainingError, match=r"step 6 .*last good checkpoint: .*step_00000004"):
        train(model, WeightedLoss([(1.0, _NaNAfter(5))]), data, opts, device="cpu", ckpt_dir=tmp_path, progress=False)
    assert (tmp_path / "step_00000004" / "student.safetensors").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_teacher_stays_frozen_and_in_eval_mode_during_training():
    data, teacher = _data(), _teacher()
    before = copy.deepcopy(teacher.model.state_dict())
    loss = build_loss([("soft_kl", 1.0, {})])
    train(_mlp(), loss, data, TrainOptions(**OPTS), teacher=lambda b: teacher(b.inputs), device="cpu", progress=False)
    assert not teacher.model.training
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_keep_best_restores_the_best_epoch():
    data = _data()
    scores = iter([0.5, 0.9, 0.1])
    snapshots = []

    def on_eval(model):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {"accuracy": next(scores)}

    model = _mlp()
    r = train(
        model,
        build_loss([("ce", 1.0, {})]),
        data,
        TrainOptions(**{**OPTS, "epochs": 3, "keep_best": "accuracy"}),
        on_eval=on_eval,
        device="cpu",
        progress=False,
    )
    assert r.best_epoch == 2 and r.best_value == 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[1][k])


def test_early_stopping_stops_after_patience():
    data = _data()
    scores = iter([0.9, 0.5, 0.5, 0.5, 0.5])
    r = train(
        _mlp(),
        build_loss([("ce", 1.0, {})]),
        data,
        TrainOptions(**{**OPTS, "epochs": 5, "early_stopping_patience": 2, "keep_best": "accuracy"}),
        on_eval=lambda m: {"accuracy": next(scores)},
        device="cpu",
        progress=False,
    )
    assert r.stopped_early and r.epochs_run == 3


def test_a_loss_that_needs_the_teacher_without_one_is_refused():
    with pytest.raises(TrainingError, match="teacher"):
        train(_mlp(), build_loss([("soft_kl", 1.0, {})]), _data(), TrainOptions(**OPTS), device="cpu", progress=False)


def test_bf16_training_runs_and_leaves_a_plain_fp32_model():
    model = _mlp()
    r = train(
        model,
        build_loss([("ce", 1.0, {})]),
        _data(),
        TrainOptions(**{**OPTS, "precision": "bf16", "grad_clip": 1.0}),
        device="cpu",
        progress=False,
    )
    assert r.steps == 8 and all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.randn(2, 6)).dtype == torch.float32


def _plain_sgd_steps(model: nn.Module, data: TensorData, steps: list[list[int]], lr: float) -> None:
    """The reference: one SGD step per list of example positions, on the mean cross-entropy of those examples."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for idx in steps:
        opt.zero_grad()
        F.cross_entropy(model(data.x[idx]), data.labels[idx]).backward()
        opt.step()


@pytest.mark.parametrize(
    ("batch_size", "grad_accum", "step_sizes"),
    [
        (2, 4, [8, 2]),  # 5 micro-batches of 2: a full group of 4, then a short group of 1
        (4, 3, [10]),  # micro-batches of 4, 4 and 2 in one group: the smaller one counts for its 2 examples
        (3, 2, [6, 4]),  # micro-batches 3+3, then 3+1: the short group's smaller last micro-batch too
    ],
)
def test_accumulated_gradient_equals_the_whole_batch_gradient(batch_size, grad_accum, step_sizes):
    data = _data(n=10)
    engine, reference = _mlp(), _mlp()
    opts = TrainOptions(
        epochs=1, batch_size=batch_size, grad_accum=grad_accum, optimizer="sgd", lr=0.5, momentum=0.0,
        schedule="constant", keep_best="none",
    )  # fmt: skip
    r = train(engine, build_loss([("ce", 1.0, {})]), data, opts, seed=4, device="cpu", progress=False)
    assert r.steps == len(step_sizes)
    order, steps = list(EpochShuffle(10, seed=4)), []
    for n in step_sizes:
        steps.append(order[:n])
        order = order[n:]
    _plain_sgd_steps(reference, data, steps, lr=0.5)
    for p, q in zip(engine.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


class _EpochRecorder(Loss):
    name = "epoch_recorder"
    needs_teacher = False

    def __init__(self):
        super().__init__()
        self.epochs: list[float] = []

    def set_epoch(self, epoch: float) -> None:
        self.epochs.append(epoch)

    def forward(self, student: ModelOutputs, teacher, batch):
        return F.cross_entropy(student.logits, batch.labels)


def test_the_loss_is_told_the_fractional_epoch_before_every_micro_batch():
    recorder = _EpochRecorder()
    opts = TrainOptions(**{**OPTS, "epochs": 2, "batch_size": 16, "grad_accum": 3})  # 4 micro-batches per epoch
    train(_mlp(), WeightedLoss([(1.0, recorder)]), _data(), opts, device="cpu", progress=False)
    assert recorder.epochs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
