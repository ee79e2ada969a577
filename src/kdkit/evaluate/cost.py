"""What a model costs, measured one way for every model of every task, so that speed-ups compare like with like.

    params, size_mb   footprint of the modules (an ensemble: summed over its members)
    latency_ms        median ms of one forward at batch 1 (`one`), after `warmup` untimed calls, over `repeats`
    throughput        examples/s at the eval batch size (`batch`): len(batch) / median seconds of one forward
    tokens_per_s      throughput × tokens per example (language models: an example is a block of tokens)
    batch_size        len(batch), the batch of the throughput figure
    members           how many networks one forward runs (an ensemble teacher: its members)

The teacher and the students are timed by this function with the same inputs and settings, then with_speedups
divides: speedup_latency = teacher latency_ms / model latency_ms, speedup_throughput = model throughput / teacher
throughput. Timing itself is evaluate.latency (medians of time.perf_counter under inference_mode, CUDA synced).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kdkit.evaluate.latency import footprint, latency_ms, throughput
from kdkit.evaluate.schema import with_speedups

__all__ = ["measure_cost", "with_speedups"]


def measure_cost(
    forward: Callable[[Any], Any],
    modules: torch.nn.Module | list[torch.nn.Module] | Mapping[str, float],
    one: Any,
    batch: Any,
    *,
    repeats: int,
    warmup: int,
    batch_repeats: int = 5,
    batch_warmup: int = 1,
    tokens_per_example: int | None = None,
) -> dict:
    """One model's cost C: {"params", "size_mb", "latency_ms", "throughput", "batch_size", "members"} and, with
    tokens_per_example, "tokens_per_s". Speed-ups are added for all models at once by with_speedups.

    forward: what the model runs at inference (a module, a Teacher, an ensemble's logits, a predict_proba).
    modules: the module(s) whose parameters and buffers it uses (a list for an ensemble: members = len(list)), or a
    footprint {"params", "size_mb"[, "members"]} already counted (a model that is not a torch module).
    one: a batch of one example; batch: a batch at the evaluation batch size; both on the device to measure and
    the same for every model compared. repeats / warmup: timed and untimed batch-1 calls (eval.latency_repeats,
    eval.latency_warmup); batch_repeats / batch_warmup: the same for the batch, fewer as each call is longer.
    """
    if isinstance(modules, Mapping):
        size = {"params": int(modules["params"]), "size_mb": float(modules["size_mb"])}
        members = int(modules.get("members", 1))
    else:
        listed = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
        size, members = footprint(listed), len(listed)
    cost = {
        **size,
        "latency_ms": latency_ms(forward, one, repeats, warmup),
        "throughput": throughput(forward, batch, batch_repeats, batch_warmup),
        "batch_size": int(len(batch)),
        "members": members,
    }
    if tokens_per_example is not None:
        cost["tokens_per_s"] = cost["throughput"] * tokens_per_example
    return cost
