"""TensorData serves whole batches (`__getitems__`: one tensor indexing per batch): the batches a shuffled, seeded
loader gives are the ones the per-example path (`__getitem__` per example, then `collate`) gave, in the same order,
through the engine's own loader (sampler, loader generator, a resume that skips the done batches)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kdkit.data import TensorData, collate
from kdkit.engine import TrainOptions
from kdkit.engine.loop import EpochShuffle, _epoch_batches, set_up
from kdkit.engine.state import TrainState
from kdkit.losses import build_loss
from kdkit.types import Batch


class PerExample(Dataset):
    """The same examples without `__getitems__`: the DataLoader reads them one by one (the path before)."""

    def __init__(self, data: TensorData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]


def _data(n: int = 45) -> TensorData:
    g = torch.Generator().manual_seed(0)
    # int32 labels: the per-example path made them int64, so must the batch path
    return TensorData(torch.randn(n, 3, 4, generator=g), torch.randint(0, 5, (n,), generator=g, dtype=torch.int32))


def _same(a: Batch, b: Batch) -> None:
    for name in ("inputs", "labels", "index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_a_batch_equals_the_collated_examples():
    data = _data()
    indices = [7, 3, 44, 3, 0]
    batch = data.__getitems__(indices)
    assert isinstance(batch, Batch) and batch.labels.dtype == torch.long
    _same(collate(batch), collate([data[i] for i in indices]))  # collate passes a whole batch through
    torch.testing.assert_close(batch.inputs[2], data.x[44])
    assert batch.index.tolist() == indices


def test_shuffled_seeded_loader_gives_the_same_batches_as_per_example_loading():
    data = _data()
    for epoch in range(3):
        loaders = []
        for ds in (data, PerExample(data)):
            sampler = EpochShuffle(len(data), seed=4)
            sampler.set_epoch(epoch)
            loaders.append(
                DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate,
                           generator=torch.Generator().manual_seed(4))
            )  # fmt: skip
        fast, slow = (list(loader) for loader in loaders)
        assert len(fast) == len(slow) == 6  # the last batch is short (45 = 5 × 8 + 5)
        for a, b in zip(fast, slow):
            _same(a, b)
        assert sorted(i for b in fast for i in b.index.tolist()) == list(range(45))


def test_the_engines_loader_and_a_resumed_epoch_give_the_same_batches():
    data = _data()
    opts = TrainOptions(epochs=2, batch_size=8)
    loss = build_loss([("ce", 1.0, {})])

    def batches(ds, epoch: int, skip: int) -> list[Batch]:
        run = set_up(torch.nn.Linear(4, 5), loss, ds, opts, teacher=None, taps=None, schedules=(), augment=None,
                     transform=None, seed=7, device="cpu", desc="t")  # fmt: skip
        return list(_epoch_batches(run, TrainState(epoch=epoch, batch_in_epoch=skip)))

    for epoch, skip in ((0, 0), (1, 0), (1, 3)):
        fast, slow = batches(data, epoch, skip), batches(PerExample(data), epoch, skip)
        assert len(fast) == len(slow) == 6 - skip
        for a, b in zip(fast, slow):
            _same(a, b)


class Noisy(TensorData):
    def __getitem__(self, i: int):
        x, y, i = super().__getitem__(i)
        return x + 1000.0, y, i


def test_a_subclass_that_changes_items_and_a_subset_keep_their_items():
    data = _data()
    noisy = Noisy(data.x, data.labels)
    batch = collate(noisy.__getitems__([1, 2]))
    torch.testing.assert_close(batch.inputs, data.x[[1, 2]] + 1000.0)  # its own __getitem__, not the fast path
    subset = Subset(data, [10, 20, 30])
    (got,) = list(DataLoader(subset, batch_size=3, collate_fn=collate))
    _same(got, collate([data[10], data[20], data[30]]))  # positions in the underlying data, as before
