"""FSDP2 (torch `fully_shard` through Accelerate) in kdkit's engine: two CPU processes on gloo train a tiny Llama to
the same weights as one unsharded process with the same global batch; checkpoints hold whole state dicts that load
into a plain model; a crash + resume under FSDP ends where an uninterrupted FSDP run ends; the student comes back
unsharded on every process.

Accelerate 1.15 turns FSDP on only for GPU-like devices (on CPU `accelerate launch --use_fsdp` either trains plain
DDP or fails with "no available devices found"; docs/scaling.md). To exercise kdkit's FSDP code paths with a real
sharded model here, the worker (this file run under torchrun) sets Accelerate's distributed type to FSDP with an
FSDP2 plugin after the usual CPU accelerator is made: test-only, so the sharding, gathering and loading are real
while the launch is the CPU one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkit.data.lm import LMData
from kdkit.engine import TrainOptions, train
from kdkit.losses import build_loss

pytest.importorskip("transformers")

V, T, N = 128, 16, 16  # vocab, block length, training blocks
PER_PROCESS_BATCH = 2  # 2 processes × 2 = the 1-process batch of 4
EPOCHS = 2


def tiny_llama():
    """A random-init 2-layer × 32-wide Llama (vocab 128), the same on every process (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def data() -> tuple[LMData, LMData]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (N + 4, T), generator=g)
    lengths = torch.randint(4, T + 1, (N + 4,), generator=g)  # unequal real lengths: the global token count matters
    return LMData(ids[:N], lengths[:N], pad_id=0), LMData(ids[N:], None, pad_id=0)


def options(batch_size: int, **kw) -> TrainOptions:
    return TrainOptions(
        epochs=EPOCHS,
        batch_size=batch_size,
        optimizer="adamw",
        lr=1e-2,
        weight_decay=0.01,
        schedule="constant",
        grad_clip=0.5,  # small enough to clip: the norm is computed over the shards
        keep_best="loss",
        **kw,
    )


def val_loss(model, val: LMData) -> dict[str, float]:
    """Mean next-token NLL on the validation blocks; every process runs the same forward (FSDP gathers in it)."""
    batch = val.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        logits = model(batch.inputs).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), batch.labels[:, 1:].reshape(-1))
    return {"loss": float(nll)}


def run(batch_size: int, ckpt_dir: Path | None, **kw):
    model = tiny_llama()
    train_data, val = data()
    result = train(
        model,
        build_loss([("token_ce", 1.0, {})]),
        train_data,
        options(batch_size, **kw.pop("opts", {})),
        on_eval=lambda m: val_loss(m, val),
        seed=3,
        device="cpu",
        ckpt_dir=ckpt_dir,
        progress=False,
        log=lambda _: None,
        **kw,
    )
    return model, result


def _force_fsdp2_on_cpu() -> None:
    """Make kdkit's engine get an FSDP2 accelerator on CPU (see the module docstring): test-only."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import kdkit.engine.loop as loop
    from kdkit.engine.runtime import make_accelerator

    def fsdp_accelerator(device, precision, grad_accum):
        accelerator = make_accelerator(device, precision, grad_accum)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
        )
        # AcceleratorState copies the distributed type from PartialState whenever it is made again.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        return accelerator

    loop.make_accelerator = fsdp_accelerator


def _crash_at_step(n: int):
    """A transform (called before every micro-batch's forward) that crashes once `n` optimizer steps are done."""

    def transform(batch, student, step):
        if step == n:
            raise RuntimeError(f"simulated crash after step {n}")
        return batch

    return transform


def worker(out: Path) -> None:
    """Under torchrun: an FSDP run with checkpoints, and a crash after 3 steps + resume."""
    from safetensors.torch import save_file

    from kdkit.engine.runtime import end_processes, init_processes, shards_model, wait_for_everyone

    world = init_processes("cpu")
    _force_fsdp2_on_cpu()
    rank = torch.distributed.get_rank()
    saw = {}
    import kdkit.engine.loop as loop

    made = loop.make_accelerator

    def spy(*a):
        acc = made(*a)
        saw["sharded"] = shards_model(acc)
        return acc

    loop.make_accelerator = spy
    model, result = run(PER_PROCESS_BATCH, out / "ckpt")
    student_type = type(model).__name__
    save_file(model.state_dict(), str(out / f"final_rank{rank}.safetensors"))
    every_step = {"checkpoint_every_steps": 1, "checkpoint_every_minutes": 0}
    try:  # a crash after 3 steps (on every process alike), then a resume from the step-3 checkpoint
        run(PER_PROCESS_BATCH, out / "crash", transform=_crash_at_step(3), opts=every_step)
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    else:
        raise AssertionError("the simulated crash did not happen")
    # As a relaunch after a crash would: every process starts the resumed run once the main one has finished
    # writing the step-3 checkpoint (else another process may read the step-2 one and the collectives mismatch).
    wait_for_everyone()
    resumed, _ = run(PER_PROCESS_BATCH, out / "crash", resume=True, opts=every_step)
    save_file(resumed.state_dict(), str(out / f"resumed_rank{rank}.safetensors"))
    if rank == 0:
        info = {"world": world, "sharded": saw["sharded"], "student_type": student_type, "steps": result.steps}
        (out / "info.json").write_text(json.dumps(info))
    end_processes()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_fsdp_processes_train_like_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    from safetensors.torch import load_file

    info = json.loads((two_process_run / "info.json").read_text())
    assert info["world"] == 2 and info["sharded"] is True
    assert info["student_type"] == "LlamaForCausalLM"  # handed back plain, not the FSDP class
    one, result = run(2 * PER_PROCESS_BATCH, tmp_path / "ckpt")
    assert info["steps"] == result.steps == EPOCHS * N // (2 * PER_PROCESS_BATCH)
    ref = one.state_dict()
    for rank in (0, 1):  # unsharded on every process
        got = load_file(str(two_process_run / f"final_rank{rank}.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            # float32 reductions happen in another order (reduce-scatter, sharded norms): equal to 1e-5
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_checkpoints_are_whole_state_dicts_that_load_into_a_plain_model(two_process_run, tmp_path):
    from kdkit.engine.checkpoint import latest_checkpoint, load_checkpoint

    ck = load_checkpoint(latest_checkpoint(two_process_run / "ckpt"))
    plain = tiny_llama()
    assert {k: tuple(v.shape) for k, v in ck["student"].items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }
    plain.load_state_dict(ck["student"], strict=True)
    plain.load_state_dict(ck["best"], strict=True)
    # The optimizer state is whole too: AdamW moments shaped like the full parameters, named by parameter.
    moments = ck["trainer"]["optimizer"]["state"]
    assert tuple(moments["model.embed_tokens.weight"]["exp_avg"].shape) == (V, 32)
    # The same checkpoint from one unsharded process holds the same weights.
    run(2 * PER_PROCESS_BATCH, tmp_path / "ckpt")
    ref = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    for k in ref["student"]:
        torch.testing.assert_close(ck["student"][k], ref["student"][k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_crash_and_resume_ends_where_an_uninterrupted_fsdp_run_ends(two_process_run):
    from safetensors.torch import load_file

    whole = load_file(str(two_process_run / "final_rank0.safetensors"))
    for rank in (0, 1):
        resumed = load_file(str(two_process_run / f"resumed_rank{rank}.safetensors"))
        for k in whole:
            torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=1e-5, msg=k)


def test_fsdp_on_cpu_through_the_environment_is_refused_with_a_clear_error(monkeypatch):
    from kdkit.engine.runtime import make_accelerator
    from kdkit.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP"):
        make_accelerator("cpu", "fp32", 1)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed"):
        make_accelerator("cpu", "fp32", 1)


if __name__ == "__main__":  # the torchrun worker
    worker(Path(sys.argv[1]))
