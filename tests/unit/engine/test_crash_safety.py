"""Crash safety: damaged or foreign checkpoints are refused; SIGTERM saves at a step boundary; a run killed with
SIGKILL at a random step and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from kdkit.data import TensorData
from kdkit.engine import TrainOptions, train
from kdkit.engine.checkpoint import latest_checkpoint, load_checkpoint
from kdkit.engine.schedules import Schedule, ScheduledValue
from kdkit.errors import TrainingError, TrainingInterrupted
from kdkit.losses import build_loss

SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn
    from kdkit.data import TensorData
    from kdkit.engine import TrainOptions, train
    from kdkit.losses import build_loss

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    opts = TrainOptions(
        epochs=4, batch_size=8, keep_best="none", checkpoint_every_steps=1, checkpoint_every_minutes=0,
        keep_checkpoints=2,
    )

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    """
)


def _run(ckpt, resume=False, **kw):
    namespace: dict = {}
    exec(SETUP, namespace)
    m = namespace["model"]()
    train(
        m,
        build_loss([("ce", 1.0, {})]),
        namespace["data"],
        namespace["opts"],
        device="cpu",
        progress=False,
        ckpt_dir=ckpt,
        resume=resume,
        **kw,
    )
    return m


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child process runs single-threaded too: identical float reductions
    yield
    torch.set_num_threads(before)


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path):
    reference = _run(tmp_path / "ref")
    child = SETUP + textwrap.dedent(
        f"""
        import time
        class Slow(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m
            def forward(self, x):
                time.sleep(0.02)
                return self.m(x)
        m = model()
        train(Slow(m), build_loss([("ce", 1.0, {{}})]), data, opts, device="cpu", progress=False,
              ckpt_dir=__import__("pathlib").Path({str(tmp_path / "run")!r}))
        """
    )
    # The child wraps the model in a slow forward (so the kill lands mid-run); state dict keys get an "m." prefix,
    # so the parent resumes through the same wrapper (without the sleep).
    kill_at = random.Random(os.getpid()).randint(5, 30)
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "OMP_NUM_THREADS": "1"})
    pointer = tmp_path / "run" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= kill_at:
            break
        if proc.poll() is not None:
            pytest.fail(f"the child exited early with {proc.returncode}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(tmp_path / "run") is not None  # the last complete checkpoint is usable
    namespace: dict = {}
    exec(SETUP, namespace)

    class Slow(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    resumed = namespace["model"]()
    torch.manual_seed(123)
    train(
        Slow(resumed),
        build_loss([("ce", 1.0, {})]),
        namespace["data"],
        namespace["opts"],
        device="cpu",
        progress=False,
        ckpt_dir=tmp_path / "run",
        resume=True,
    )
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    reference = _run(tmp_path / "ref")
    calls = {"n": 0}

    def teacher(batch):  # not used by the loss; a place to send the signal from inside the loop
        calls["n"] += 1
        if calls["n"] == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return None

    namespace: dict = {}
    exec(SETUP, namespace)
    m = namespace["model"]()
    loss = build_loss([("ce", 1.0, {}), ("soft_kl", 0.0, {})])
    opts = TrainOptions(**{**namespace["opts"].__dict__, "checkpoint_every_steps": 1000})
    with pytest.raises(TrainingInterrupted, match=r"stopped by signal 15 at step 9; checkpoint saved") as info:
        train(
            m,
            loss,
            namespace["data"],
            opts,
            device="cpu",
            progress=False,
            ckpt_dir=tmp_path / "b",
            teacher=teacher,
            schedules=[ScheduledValue(1, "weight", Schedule("constant", 0.0))],
        )
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 9
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    resumed = _run(tmp_path / "b", resume=True)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "other")
    path = latest_checkpoint(tmp_path / "a")
    load_checkpoint(path)  # intact: loads
    student = path / "student.safetensors"
    data = bytearray(student.read_bytes())
    data[-5] ^= 0xFF
    student.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match=r"student\.safetensors is damaged or foreign"):
        load_checkpoint(path)
    other = latest_checkpoint(tmp_path / "other")
    (path / "student.safetensors").write_bytes((other / "student.safetensors").read_bytes())
    (path / "trainer.pt").write_bytes(b"")  # truncated
    with pytest.raises(TrainingError, match=r"trainer\.pt is damaged or foreign"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(TrainingError, match="no manifest.json"):
        load_checkpoint(path)
    with pytest.raises(TrainingError, match="no manifest.json"):
        _run(tmp_path / "a", resume=True)


def test_a_damaged_teacher_cache_is_named_and_rebuilt(tmp_path):
    from kdkit.data import TeacherCache
    from kdkit.teachers import Teacher

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(20, 4, generator=g), torch.randint(0, 2, (20,), generator=g))
    teacher = Teacher(nn.Linear(4, 2))
    logs = []
    cache = TeacherCache.build_or_load(data, teacher.logits, teacher.fingerprint(), tmp_path, log=logs.append)
    raw = bytearray(cache.path.read_bytes())
    raw[-3] ^= 0xFF
    cache.path.write_bytes(bytes(raw))
    again = TeacherCache.build_or_load(data, teacher.logits, teacher.fingerprint(), tmp_path, log=logs.append)
    assert "is damaged" in logs[1] and "rebuilding" in logs[1]
    torch.testing.assert_close(torch.tensor(again.logits[:]), teacher(data.x).logits)


def _rewrite(path, name: str, payload: bytes) -> None:
    """Replace a checkpoint file and update its manifest entry, so that the hash check passes."""
    from kdkit.atomic import sha256_file

    (path / name).write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest[name] = {"sha256": sha256_file(path / name), "bytes": len(payload)}
    (path / "manifest.json").write_text(json.dumps(manifest))


class Foreign:  # a pickled object, as another trainer's checkpoint might hold
    pass


def test_a_checkpoint_weights_only_refuses_says_so_not_damaged(tmp_path):
    import io

    _run(tmp_path / "a")
    path = latest_checkpoint(tmp_path / "a")
    buffer = io.BytesIO()
    torch.save({"optimizer": {}, "scheduler": {}, "rng": torch.get_rng_state(), "extra": Foreign()}, buffer)
    _rewrite(path, "trainer.pt", buffer.getvalue())
    with pytest.raises(TrainingError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "trainer.pt holds a pickled" in message and "Foreign" in message
    assert "weights_only=True" in message and "not written by this kdkit version" in message
    assert "damaged" not in message


def test_out_of_memory_while_loading_a_checkpoint_says_out_of_memory(tmp_path, monkeypatch):
    _run(tmp_path / "a")
    path = latest_checkpoint(tmp_path / "a")

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(TrainingError, match=r"out of memory while loading .*trainer\.pt") as info:
        load_checkpoint(path)
    assert "damaged" not in str(info.value)

    def no_cpu_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_cpu_memory)
    with pytest.raises(TrainingError, match=r"out of memory while loading .*trainer\.pt"):
        load_checkpoint(path)


def test_a_truncated_file_whose_manifest_matches_is_damaged(tmp_path):
    _run(tmp_path / "a")
    path = latest_checkpoint(tmp_path / "a")
    _rewrite(path, "trainer.pt", (path / "trainer.pt").read_bytes()[:100])
    with pytest.raises(TrainingError, match=r"trainer\.pt is damaged: it cannot be read"):
        load_checkpoint(path)
    _rewrite(path, "student.safetensors", (path / "student.safetensors").read_bytes()[:50])
    with pytest.raises(TrainingError, match=r"student\.safetensors is damaged: it cannot be read"):
        load_checkpoint(path)


class NoisyData(TensorData):
    """Each example gets fresh noise from torch's global generator: in a loading worker, the worker's generator,
    seeded from the loader's generator when an epoch's iterator starts (so the worker seeds matter)."""

    def __getitem__(self, i: int):
        x, y, i = super().__getitem__(i)
        return x + 0.5 * torch.randn(x.shape), y, i


def test_resume_with_loading_workers_equals_uninterrupted(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = NoisyData(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))
    # 12 steps an epoch, a history record every 3 steps; checkpoints at steps 7 and 14 fall inside a record's window
    opts = TrainOptions(
        epochs=3,
        batch_size=8,
        keep_best="loss",
        checkpoint_every_steps=7,
        checkpoint_every_minutes=0,
        num_workers=2,
        schedule="cosine",
    )
    loss = build_loss([("ce", 1.0, {})])

    def on_eval(model):
        with torch.no_grad():
            return {"loss": torch.nn.functional.cross_entropy(model(data.x), data.labels).item()}

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def crash_in_step_17(batch, student, step):
        if step == 16:
            raise RuntimeError("simulated crash")
        return batch

    kw = dict(on_eval=on_eval, seed=5, device="cpu", progress=False, log=lambda _: None)
    full = model()
    r_full = train(full, loss, data, opts, ckpt_dir=tmp_path / "a", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model(), loss, data, opts, ckpt_dir=tmp_path / "b", transform=crash_in_step_17, **kw)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 14  # epoch 2, 2 batches in
    resumed = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    r2 = train(resumed, loss, data, opts, ckpt_dir=tmp_path / "b", resume=True, **kw)
    assert r2.steps == r_full.steps == 36
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert r2.history == r_full.history
    assert r2.best_epoch == r_full.best_epoch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_restores_the_cuda_generator(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    opts = TrainOptions(epochs=2, batch_size=8, keep_best="none", checkpoint_every_steps=3, checkpoint_every_minutes=0)
    loss = build_loss([("ce", 1.0, {})])

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3))

    def crash_in_step_6(batch, student, step):
        if step == 5:
            raise RuntimeError("simulated crash")
        return batch

    kw = dict(seed=2, device="cuda", progress=False, log=lambda _: None)
    full = model()
    train(full, loss, data, opts, ckpt_dir=tmp_path / "a", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model(), loss, data, opts, ckpt_dir=tmp_path / "b", transform=crash_in_step_6, **kw)
    torch.cuda.manual_seed_all(99)  # whatever the CUDA generator holds now, the checkpoint's state must win
    resumed = model()
    train(resumed, loss, data, opts, ckpt_dir=tmp_path / "b", resume=True, **kw)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
