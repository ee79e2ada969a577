"""The progress bar hands its step counts to rich in batches (at most every _Progress.EVERY_S seconds) and loses
none: everything counted is shown before a record, a note, and at the end."""

from __future__ import annotations

from kdkit.engine.monitor import _Progress


def _completed(bar: _Progress) -> float:
    return bar.progress.tasks[0].completed


def test_counts_are_batched_and_none_is_lost():
    bar = _Progress(total=500, desc="t", enabled=True)
    bar.EVERY_S = 3600.0  # within the test, never by time
    bar._flush()
    for _ in range(7):
        bar.advance(1)
    assert _completed(bar) == 0 and bar.pending == 7  # counted, not yet handed to rich
    bar.show({"step": 7, "train/total": 0.5})
    assert _completed(bar) == 7 and bar.pending == 0
    bar.advance(3)
    bar.note("epoch 1")
    assert _completed(bar) == 10
    bar.advance(490)
    bar.close()
    assert _completed(bar) == 500


def test_a_disabled_bar_counts_nothing():
    bar = _Progress(total=5, desc="t", enabled=False)
    bar.advance(3)
    bar.show({"train/total": 1.0})
    bar.close()
    assert bar.pending == 0
