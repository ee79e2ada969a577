"""Checkpoints by wall-clock interval (train.checkpoint_every_minutes): a checkpoint point (an epoch end, or every
checkpoint_every_steps) is taken only once the interval has passed since the last checkpoint; the final state, an
early stop and a signal are always written. A fake clock stands for the wall clock, so nothing here is timed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from torch import nn

import kdkit.engine.checkpoint as checkpoint
import kdkit.engine.loop as loop
from kdkit.data import TensorData
from kdkit.engine import TrainOptions, train
from kdkit.engine.checkpoint import CheckpointCadence, latest_checkpoint
from kdkit.losses import build_loss


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(checkpoint, "clock", fake)
    return fake


@pytest.fixture
def saves(monkeypatch):
    """The step of every checkpoint the loop writes."""
    steps: list[int] = []
    real = loop.save

    def recording(run, state, ckpt_dir, keep):
        steps.append(state.step)
        real(run, state, ckpt_dir, keep)

    monkeypatch.setattr(loop, "save", recording)
    return steps


def test_cadence_takes_a_point_only_after_the_interval(clock):
    by_epoch = CheckpointCadence(every_steps=0, every_minutes=1.5)
    clock.now = 89.0
    assert not by_epoch.due(10, end_of_epoch=True)
    clock.now = 90.0
    assert not by_epoch.due(10, end_of_epoch=False)  # not a point: mid-epoch without a step budget
    assert by_epoch.due(10, end_of_epoch=True)
    by_epoch.mark()
    clock.now = 179.0
    assert not by_epoch.due(20, end_of_epoch=True)  # the interval counts from the last checkpoint

    by_steps = CheckpointCadence(every_steps=4, every_minutes=0)  # 0: every point, as before the interval
    assert [s for s in range(1, 13) if by_steps.due(s, end_of_epoch=s == 6)] == [4, 8, 12]
    with pytest.raises(ValueError, match=r"checkpoint_every_minutes=-1; expected >= 0"):
        CheckpointCadence(0, -1)


def _data() -> TensorData:
    g = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _train(opts, ckpt_dir, clock=None, crash_at=None, resume=False, **kw):
    """4 steps an epoch; with `clock`, every step takes 20 fake seconds; `crash_at`: raise before that step."""

    def transform(batch, student, step):
        if crash_at is not None and step + 1 == crash_at:
            raise RuntimeError("simulated crash")
        if clock is not None:
            clock.now = 20.0 * (step + 1)  # the time at the end of this step
        return batch

    if clock is not None:
        clock.now = 0.0  # the run starts at 0 s
    model = _model()
    result = train(model, build_loss([("ce", 1.0, {})]), _data(), opts, seed=2, device="cpu", progress=False,
                   ckpt_dir=ckpt_dir, resume=resume, transform=transform, log=lambda _: None, **kw)  # fmt: skip
    return model, result


def test_the_default_interval_writes_only_the_final_state_of_a_short_run(tmp_path, saves):
    opts = TrainOptions(epochs=3, batch_size=8, keep_best="none")
    assert opts.checkpoint_every_minutes > 0
    _train(opts, tmp_path / "a")
    assert saves == [12]
    assert latest_checkpoint(tmp_path / "a").name == "step_00000012"


def test_interval_zero_writes_every_epoch_as_before(tmp_path, saves):
    _train(TrainOptions(epochs=3, batch_size=8, keep_best="none", checkpoint_every_minutes=0), tmp_path / "a")
    assert saves == [4, 8, 12]


def test_epoch_ends_are_taken_once_the_interval_has_passed(tmp_path, clock, saves):
    # epoch ends at 80, 160, 240, 320, 400 s; 1.5 min after the last checkpoint: 160 (≥ 90), 320 (160 ≥ 90), 400 final
    opts = TrainOptions(epochs=5, batch_size=8, keep_best="none", checkpoint_every_minutes=1.5)
    _train(opts, tmp_path / "a", clock=clock)
    assert saves == [8, 16, 20]


def test_an_early_stop_writes_its_state(tmp_path, clock, saves):
    opts = TrainOptions(epochs=6, batch_size=8, keep_best="loss", early_stopping_patience=1)
    _, result = _train(opts, tmp_path / "a", clock=clock, on_eval=lambda m: {"loss": 1.0})  # never better
    assert result.stopped_early and result.epochs_run == 2
    assert saves == [8]


def test_a_crash_loses_at_most_the_interval_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, clock, saves):
    # A checkpoint point every step, an interval of 1 minute: a checkpoint every 3 steps (20 s each).
    opts = TrainOptions(epochs=4, batch_size=8, keep_best="none", checkpoint_every_steps=1, checkpoint_every_minutes=1)
    reference, ref_result = _train(opts, tmp_path / "ref", clock=clock)
    assert saves == [3, 6, 9, 12, 15, 16]
    crash_at = random.Random(os.getpid()).randint(4, 15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(opts, tmp_path / "b", clock=clock, crash_at=crash_at)
    done = crash_at - 1
    kept = json.loads((tmp_path / "b" / "latest.json").read_text())["step"]
    assert 0 <= done - kept < 3, (done, kept)  # at most the interval's work (3 steps) is lost
    resumed, result = _train(opts, tmp_path / "b", clock=clock, resume=True)
    assert result.steps == ref_result.steps == 16 and result.history == ref_result.history
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    import kdkit.engine.checkpoint as checkpoint
    from kdkit.data import TensorData
    from kdkit.engine import TrainOptions, train
    from kdkit.losses import build_loss

    torch.set_num_threads(1)
    progress, ckpt = sys.argv[1], sys.argv[2]
    fake = {"now": 0.0}
    checkpoint.clock = lambda: fake["now"]  # every step takes 20 fake seconds: a checkpoint every 3 steps
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    opts = TrainOptions(epochs=4, batch_size=8, keep_best="none", checkpoint_every_steps=1, checkpoint_every_minutes=1)

    def steps_done(batch, student, step):  # called before step + 1: `step` steps are done (and checkpointed)
        with open(progress, "a") as f:
            f.write(f"{step}\\n")
        fake["now"] = 20.0 * (step + 1)
        time.sleep(0.02)
        return batch

    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    train(m, build_loss([("ce", 1.0, {})]), data, opts, device="cpu", progress=False,
          ckpt_dir=__import__("pathlib").Path(ckpt), transform=steps_done)
    """
)


def test_sigkill_with_an_interval_loses_at_most_the_interval_then_resume_equals_uninterrupted(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: identical float reductions
    try:
        done, kept, reference, resumed = _sigkill_then_resume(tmp_path)
    finally:
        torch.set_num_threads(before)
    assert kept % 3 == 0 and 0 <= done - kept < 3, (done, kept)  # at most the interval's work (3 steps) is lost
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def _steps_done(progress) -> int:
    """The child's last complete line (a SIGKILL may cut the one being written)."""
    lines = progress.read_text().split("\n")[:-1] if progress.is_file() else []
    return int(lines[-1]) if lines else -1


def _sigkill_then_resume(tmp_path):
    """(steps the child finished, the step of its last checkpoint, an uninterrupted run, the resumed run)."""
    progress, ckpt = tmp_path / "progress", tmp_path / "run"
    kill_at = random.Random(os.getpid()).randint(5, 40)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(progress), str(ckpt)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        if _steps_done(progress) >= kill_at:
            break
        if proc.poll() is not None:
            pytest.fail(f"the child exited early with {proc.returncode}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _steps_done(progress)
    kept = json.loads((ckpt / "latest.json").read_text())["step"]

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    opts = TrainOptions(epochs=4, batch_size=8, keep_best="none", checkpoint_every_steps=1, checkpoint_every_minutes=1)

    def run(ckpt_dir, resume):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        torch.manual_seed(123)  # whatever the global generator holds, a resumed run takes the checkpoint's
        train(m, build_loss([("ce", 1.0, {})]), data, opts, device="cpu", progress=False, ckpt_dir=ckpt_dir,
              resume=resume)  # fmt: skip
        return m

    return done, kept, run(tmp_path / "ref", False), run(ckpt, True)


def test_the_scheduler_counts_the_optimizer_the_loop_steps(tmp_path):
    """The loop steps the optimizer inside Accelerate's wrapper (see loop._stepper); the LR schedule must still see
    those steps: torch warns when a scheduler steps before its optimizer ever did."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = _train(TrainOptions(epochs=2, batch_size=8, keep_best="none", schedule="cosine"), None)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    lrs = [r["lr"] for r in result.history if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 3e-3  # the cosine decay went on step by step
