"""Token-level training: every optimizer step divides by the step's global count of real tokens, whatever the
split into micro-batches, and equals a plain reference loop written out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.data.lm import LMData
from kdkit.engine import TrainOptions, train
from kdkit.losses import build_loss

V, T = 13, 7


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))  # (B, T, V)


def _data() -> LMData:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (8, T), generator=g)
    lengths = torch.tensor([7, 2, 5, 7, 3, 6, 4, 7])  # very unequal real lengths: per-batch means would differ
    return LMData(ids, lengths, pad_id=0)


def _train(batch_size: int, accum: int) -> nn.Module:
    model = TinyLM()
    opts = TrainOptions(
        epochs=2, batch_size=batch_size, grad_accum=accum, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant"
    )
    train(model, build_loss([("token_ce", 1.0, {})]), _data(), opts, seed=3, device="cpu", progress=False)
    return model


def test_micro_batch_split_does_not_change_training():
    whole = _train(4, 1)
    for batch_size, accum in ((2, 2), (1, 4)):
        split = _train(batch_size, accum)
        for p, q in zip(whole.parameters(), split.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_equals_a_plain_loop_that_divides_by_the_real_token_count():
    from kdkit.engine.loop import EpochShuffle

    data = _data()
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = EpochShuffle(len(data), 3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), 4):
            batch = data.collate([data[i] for i in order[start : start + 4]])
            logits = model(batch.inputs)
            keep = batch.labels[:, 1:] != -100
            loss = F.cross_entropy(logits[:, :-1][keep], batch.labels[:, 1:][keep], reduction="sum") / keep.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    engine = _train(2, 2)
    for p, q in zip(model.parameters(), engine.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_token_kl_with_a_teacher_is_also_split_invariant():
    torch.manual_seed(7)
    teacher_model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).eval()

    def teacher(batch):
        from kdkit.types import ModelOutputs

        with torch.no_grad():
            return ModelOutputs(teacher_model(batch.inputs))

    def run(batch_size, accum):
        model = TinyLM()
        opts = TrainOptions(
            epochs=1, batch_size=batch_size, grad_accum=accum, optimizer="sgd", lr=0.5, momentum=0.0,
            schedule="constant",
        )  # fmt: skip
        loss = build_loss([("token_kl", 1.0, {"direction": "reverse"}), ("token_ce", 0.5, {})])
        train(model, loss, _data(), opts, teacher=teacher, seed=3, device="cpu", progress=False)
        return model

    whole, split = run(4, 1), run(1, 4)
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_a_short_last_group_divides_by_its_own_token_count():
    """8 blocks, micro-batches of 2, 3 per step: steps of 6 and 2 blocks, each divided by its own real tokens."""
    from kdkit.engine.loop import EpochShuffle

    data = _data()
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    order = list(EpochShuffle(len(data), 3))
    for idx in (order[:6], order[6:]):
        batch = data.collate([data[i] for i in idx])
        logits = model(batch.inputs)
        keep = batch.labels[:, 1:] != -100
        loss = F.cross_entropy(logits[:, :-1][keep], batch.labels[:, 1:][keep], reduction="sum") / keep.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    engine = TinyLM()
    opts = TrainOptions(
        epochs=1, batch_size=2, grad_accum=3, optimizer="sgd", lr=0.5, momentum=0.0, schedule="constant"
    )
    r = train(engine, build_loss([("token_ce", 1.0, {})]), data, opts, seed=3, device="cpu", progress=False)
    assert r.steps == 2
    for p, q in zip(model.parameters(), engine.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_unshifted_token_losses_divide_by_the_unshifted_count_across_micro_batches():
    """shift: false predicts every labelled position: the engine's count for it must be the unshifted one, and
    split into micro-batches the step must still equal the whole batch (and a plain loop dividing by labels ≠ -100)."""
    from kdkit.engine.loop import EpochShuffle

    def run(batch_size, accum):
        model = TinyLM()
        opts = TrainOptions(
            epochs=1, batch_size=batch_size, grad_accum=accum, optimizer="sgd", lr=0.5, momentum=0.0,
            schedule="constant",
        )  # fmt: skip
        train(model, build_loss([("token_ce", 1.0, {"shift": False})]), _data(), opts, seed=3, device="cpu",
              progress=False)  # fmt: skip
        return model

    data = _data()
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    order = list(EpochShuffle(len(data), 3))
    for start in range(0, len(order), 4):
        batch = data.collate([data[i] for i in order[start : start + 4]])
        keep = batch.labels != -100
        loss = F.cross_entropy(model(batch.inputs)[keep], batch.labels[keep], reduction="sum") / keep.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for engine in (run(4, 1), run(1, 4), run(2, 2)):
        for p, q in zip(model.parameters(), engine.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
