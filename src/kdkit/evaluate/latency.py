"""What a model costs: parameters, memory, latency and throughput.

Timings are medians (one slow call from a page fault or a frequency change does not move them) of wall-clock
time.perf_counter around the call, under torch.inference_mode(). On CUDA the device is synchronised after each call,
because kernels are queued asynchronously and the call would otherwise return before the work is done.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def footprint(modules: torch.nn.Module | list[torch.nn.Module]) -> dict:
    """{"params": number of parameters (trainable or not), "size_mb": bytes of parameters and buffers / 1e6}.

    A list (the members of an ensemble) is summed. Within one module a shared parameter counts once, as
    module.parameters() yields it once.
    """
    if isinstance(modules, torch.nn.Module):
        modules = [modules]
    params = 0
    size_bytes = 0
    for module in modules:
        for p in module.parameters():
            params += p.numel()
            size_bytes += p.numel() * p.element_size()
        for b in module.buffers():
            size_bytes += b.numel() * b.element_size()
    return {"params": int(params), "size_mb": size_bytes / 1e6}


def latency_ms(
    forward: Callable[[torch.Tensor], Any], example: torch.Tensor, repeats: int = 50, warmup: int = 10
) -> float:
    """Median milliseconds of one forward(example) call; example is a batch of 1, on the device to measure.

    forward is called warmup + repeats times; the first `warmup` calls are not timed (they pay for lazy
    initialisation, allocator growth and kernel selection). The return value of forward is ignored.
    """
    return statistics.median(_call_times(forward, example, repeats, warmup)) * 1e3


def throughput(forward: Callable[[torch.Tensor], Any], batch: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Samples per second at this batch size: len(batch) / median seconds of one forward(batch) call.

    forward is called warmup + repeats times; the warmup calls are not timed. The return value is ignored.
    """
    seconds = statistics.median(_call_times(forward, batch, repeats, warmup))
    return batch.shape[0] / max(seconds, 1e-12)  # a stub can return faster than the clock resolves


def _call_times(forward: Callable[[torch.Tensor], Any], inputs: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of `repeats` timed calls, after `warmup` untimed ones. inputs: a tensor, or any batch that
    forward takes (a numpy array)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")

    def synchronize() -> None:
        if getattr(inputs, "is_cuda", False):  # a numpy array (a scikit-learn model's inputs) runs on the CPU
            torch.cuda.synchronize(inputs.device)

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward(inputs)
        synchronize()
        for _ in range(repeats):
            start = time.perf_counter()
            forward(inputs)
            synchronize()
            times.append(time.perf_counter() - start)
    return times
