"""Optimizer and learning-rate schedule (linear warm-up, then constant, cosine or step decay)."""

from __future__ import annotations

import math

import torch


def build_optimizer(
    params, optimizer: str, lr: float, weight_decay: float, momentum: float, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """device_type: where training runs (the parameters may still be on the CPU when the optimizer is built)."""
    params = [p for p in params if p.requires_grad]
    if optimizer == "adamw":
        # The fused kernel (one pass over all parameters) is used on CUDA. Not on CPU, though it saved ~0.35 s of
        # a 10 s LLM step there (bench/llm.py): the CPU kernel's rounding depends on the thread count, so a run
        # resumed with another number of threads would no longer be bit-equal to an uninterrupted one.
        fused = device_type == "cuda" and bool(params) and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r}; expected adamw or sgd")


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str,
    warmup_steps: int,
    steps_per_epoch: int,
    step_every_epochs: int,
    step_gamma: float,
) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        span = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return step_gamma ** ((step // max(1, steps_per_epoch)) // step_every_epochs)
    raise ValueError(f"schedule={schedule!r}; expected constant, linear, cosine or step")


def build_scheduler(
    optimizer,
    total_steps: int,
    schedule: str,
    warmup_steps: int,
    steps_per_epoch: int,
    step_every_epochs: int,
    step_gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, total_steps, schedule, warmup_steps, steps_per_epoch, step_every_epochs, step_gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
