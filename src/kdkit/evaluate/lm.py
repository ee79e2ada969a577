"""Language-model quality on held-out text: perplexity, next-token accuracy, top-1 agreement and KL with the teacher.

All models are run over the same batches in one pass, the teacher once per batch. Per predicted position
(labels[b, t + 1] ≠ -100, the causal shift):
    nll          −log q(real next token), averaged over every predicted token of the split (not per block)
    perplexity   exp(nll)
    accuracy     argmax q = the real next token
    agreement    argmax q = argmax p_teacher (the teacher: 1)
    kl           KL(p_teacher ‖ q) in nats (forward KL, at temperature 1; the teacher: 0)
    acceptance   Σ_v min(p_teacher, q) = 1 − TV(p_teacher, q): the probability that the teacher, as the target of
                 speculative decoding with sampling at temperature 1, accepts a token this model drafted there
                 (Leviathan et al. 2023; DistillSpec; the teacher: 1)
All in float32 (the log-softmax of bf16 logits loses the small probabilities the KL is made of).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

Forward = Callable[[torch.Tensor], torch.Tensor]  # input ids (B, T) → logits (B, T, V)


def lm_metrics(
    models: dict[str, Forward],
    data: Dataset,
    batch_size: int,
    device: str,
    teacher: str | None = None,
    vocab_size: int | None = None,
    on_batch: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{name: {nll, perplexity, accuracy, agreement, kl, acceptance, tokens}} for each model over `data` (an LMData).

    teacher: the key of the teacher in `models` (agreement and kl need it). vocab_size: compare only the first
    vocab_size logits (a padded vocabulary); None requires equal widths. on_batch(logits by name (B, T, V), labels)
    sees every batch's full logits, so that other measurements share these forward passes instead of repeating them.
    """
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=data.collate)
    sums = {name: {"nll": 0.0, "correct": 0.0, "agree": 0.0, "kl": 0.0, "accept": 0.0} for name in models}
    tokens = 0
    with torch.inference_mode():
        for batch in loader:
            inputs, labels = batch.inputs.to(device), batch.labels.to(device)
            keep = labels[:, 1:] != -100
            rows, cols = keep.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            target = labels[rows, cols + 1]
            tokens += rows.numel()
            logp, full = {}, {}
            for name, forward in models.items():
                full[name] = _logits(forward(inputs))
                logits = full[name][rows, cols].float()
                if vocab_size is not None:
                    logits = logits[:, :vocab_size]
                logp[name] = F.log_softmax(logits, dim=-1)  # (N, V)
            if on_batch is not None:
                on_batch(full, labels)
            del full
            t_logp = logp.get(teacher) if teacher is not None else None
            t_top = t_logp.argmax(-1) if t_logp is not None else None
            for name, lp in logp.items():
                s = sums[name]
                s["nll"] -= lp.gather(1, target[:, None]).sum().item()
                top = lp.argmax(-1)
                s["correct"] += (top == target).sum().item()
                if t_logp is not None:
                    s["agree"] += (top == t_top).sum().item()
                    s["kl"] += (t_logp.exp() * (t_logp - lp)).sum().item()
                    s["accept"] += torch.minimum(t_logp, lp).exp().sum().item()  # min(p, q) = exp(min(log p, log q))
    if tokens == 0:
        raise ValueError("lm_metrics: the data holds no predicted token")
    out = {}
    for name, s in sums.items():
        nll = s["nll"] / tokens
        out[name] = {
            "nll": nll,
            "perplexity": math.exp(min(nll, 700.0)),
            "accuracy": s["correct"] / tokens,
            "tokens": tokens,
        }
        if teacher is not None:
            out[name]["agreement"] = s["agree"] / tokens
            out[name]["kl"] = s["kl"] / tokens
            out[name]["acceptance"] = s["accept"] / tokens
    return out


def _logits(out) -> torch.Tensor:
    return getattr(out, "logits", out)


def tokens_per_second(forward: Forward, inputs: torch.Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Forward throughput on a batch of token ids (B, T): B·T / median seconds per call."""
    from kdkit.evaluate.latency import throughput

    return throughput(forward, inputs, repeats, warmup) * inputs.shape[1]
