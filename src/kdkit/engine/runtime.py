"""The one place that knows about devices, processes and precision: a thin boundary around Accelerate.

Accelerate keeps its state per process (a singleton). kdkit trains several networks in one process (teacher
members, baseline, student), possibly at different precisions, so each training run starts a fresh
AcceleratorState while keeping the process group (PartialState) of a multi-process launch.

Sharded training (FSDP through `accelerate launch --config_file configs/accelerate/fsdp.yaml`, i.e. the
ACCELERATE_USE_FSDP / FSDP_* environment) splits the student's parameters, gradients and optimizer state across
processes. The helpers below (`shards_model`, `full_state_dict`, `load_full_state_dict`, `full_optimizer_state`,
`load_full_optimizer_state`) turn that into whole, unsharded state dicts for checkpoints and back, through
torch.distributed.checkpoint's state-dict functions (which handle FSDP1 and FSDP2 alike). Without sharding they are
exactly the plain `state_dict()` / `load_state_dict()` calls.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from kdkit.errors import ConfigError

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_device(device: str) -> str:
    """auto → cuda when available, else cpu; cuda without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' asked for, but no CUDA device is available; use auto or cpu")
    return device


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(device: str, precision: str, grad_accum: int) -> Accelerator:
    device = resolve_device(device)
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision: 'fp16' needs a CUDA device; on CPU use bf16 or fp32")
    # Accelerate 1.15 turns FSDP/DeepSpeed on only for GPU-like devices: on CPU it silently trains unsharded (DDP)
    # or fails inside the plugin ("no available devices found"). Say so instead (measured; docs/scaling.md).
    if device == "cpu" and _env_flag("ACCELERATE_USE_FSDP"):
        raise ConfigError(
            "run.device: 'cpu' with FSDP (accelerate launch --use_fsdp / ACCELERATE_USE_FSDP); Accelerate shards "
            "models only on GPUs; expected a CUDA device, or launch on CPU without FSDP (plain DDP)"
        )
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        # Its ZeRO optimizer keeps partitioned state that kdkit's checkpoints (whole state dicts, exact resume)
        # cannot hold yet; refusing beats a run whose checkpoints cannot be resumed.
        raise ConfigError(
            "accelerate launch --use_deepspeed: DeepSpeed is not supported by kdkit's engine (its checkpoints "
            "need whole optimizer states); expected FSDP instead: --config_file configs/accelerate/fsdp.yaml"
        )
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=device == "cpu", mixed_precision=_PRECISION[precision], gradient_accumulation_steps=grad_accum
    )


def micro_batch(accelerator: Accelerator, model, last: bool):
    """The context of one micro-batch of gradient accumulation; `last` ends the optimizer step.

    The loop reads a whole step's micro-batches before the first forward (token losses need the step's token
    count), so Accelerate's own `accumulate` — which ends a step when the loader is exhausted — would see the
    loader's end too early. As Hugging Face's Trainer does, the step's end is set explicitly: gradients are
    synchronised across processes only on the last micro-batch, and the wrapped optimizer steps only then.
    backward() still divides the loss by gradient_accumulation_steps.
    """
    import contextlib

    accelerator.gradient_state._set_sync_gradients(last)
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def shards_model(accelerator: Accelerator) -> bool:
    """True when the prepared model's parameters are split across processes (FSDP, version 1 or 2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_state_dict(accelerator: Accelerator, model, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of a prepared model (keys of the unwrapped model).

    Unsharded: `unwrap_model(model).state_dict()` (tensors where they live). Sharded: a collective that every
    process must call, in the same order; the tensors come back on the CPU, on the main process only (others get
    {}) unless `everywhere`, which gathers onto every process's device first and then copies to the CPU.
    """
    if not shards_model(accelerator):
        return accelerator.unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    return {k: v.detach().cpu() for k, v in state.items()} if everywhere else state


def load_full_state_dict(accelerator: Accelerator, model, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict into a prepared model; sharded, every process passes the same whole dict (read from
    the checkpoint) and keeps its own shard."""
    if not shards_model(accelerator):
        accelerator.unwrap_model(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(accelerator: Accelerator, model, optimizer) -> dict:
    """The optimizer's whole state (a collective when sharded: on the main process only, parameters named by their
    keys in the model instead of by position)."""
    if not shards_model(accelerator):
        return optimizer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer.optimizer, options=options)


def load_full_optimizer_state(accelerator: Accelerator, model, optimizer, state: dict) -> None:
    """The inverse of `full_optimizer_state`; sharded, every process passes the same whole state."""
    if not shards_model(accelerator):
        optimizer.optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


def average_gradients(accelerator: Accelerator, params: list) -> None:
    """Average across processes the gradients of parameters trained beside the prepared model (a loss's adapters
    and projections): DDP averages only the gradients of the model it wraps, so without this each process would
    step its own adapters apart from the others'. A no-op in one process."""
    if accelerator.num_processes == 1:
        return
    import torch

    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # every process joins every reduction
        p.grad = accelerator.reduce(grad, "mean")


def is_main_process() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


def world_size() -> int:
    from accelerate.state import PartialState

    return PartialState().num_processes


def wait_for_everyone() -> None:
    """A barrier across processes (a no-op in one process)."""
    from accelerate.state import PartialState

    PartialState().wait_for_everyone()


def main_process_first():
    """Context: the main process runs the block first (e.g. builds a cache), the others after it (and reuse it)."""
    from accelerate.state import PartialState

    return PartialState().main_process_first()


def init_processes(device: str) -> int:
    """Join the process group of a multi-process launch (torchrun / accelerate launch), on CPU through gloo.
    Must run before anything asks Accelerate about processes; returns the number of processes."""
    from accelerate.state import PartialState

    return PartialState(cpu=resolve_device(device) == "cpu").num_processes


def end_processes() -> None:
    """Leave the process group at the end of a multi-process launch (a no-op in one process): every process waits
    for the others, then closes its group. A process that exits with the group still open can abort in the backend's
    threads at interpreter exit ("terminate called without an active exception") and fail a finished launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
