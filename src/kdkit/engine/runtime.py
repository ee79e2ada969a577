"""The one place that knows about devices, processes and precision: a thin boundary around Accelerate.

Accelerate keeps its state per process (a singleton). kdkit trains several networks in one process (teacher
members, baseline, student), possibly at different precisions, so each training run starts a fresh
AcceleratorState while keeping the process group (PartialState) of a multi-process launch.
"""

from __future__ import annotations

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


def make_accelerator(device: str, precision: str, grad_accum: int) -> Accelerator:
    device = resolve_device(device)
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision: 'fp16' needs a CUDA device; on CPU use bf16 or fp32")
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
