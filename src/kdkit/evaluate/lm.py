"""Language-model quality on held-out text: perplexity, bits per byte and per character, next-token accuracy, top-1
agreement and KL with the teacher.

All models are run over the same batches in one pass, the teacher once per batch. Per predicted position
(labels[b, t + 1] ≠ -100, the causal shift):
    nll          −log q(real next token), averaged over every predicted token of the split (not per block)
    perplexity   exp(nll)
    bits/byte    Σ −log2 q(real next token) over the predicted tokens ÷ the UTF-8 bytes of the text those tokens
                 cover (bits_per_byte); bits_per_char the same ÷ its characters. = nll / ln 2 × tokens / bytes.
                 Perplexity is per token, so it moves with the tokenizer; bits per byte of the same text do not,
                 so models with different tokenizers compare. Needs a decode function (predicted_text_size);
                 special tokens (the end-of-document token) are scored but stand for no text.
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
Decode = Callable[[list[int]], str]  # token ids → the text they stand for
IGNORE = -100


def lm_metrics(
    models: dict[str, Forward],
    data: Dataset,
    batch_size: int,
    device: str,
    teacher: str | None = None,
    vocab_size: int | None = None,
    on_batch: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    decode: Decode | None = None,
) -> dict[str, dict[str, float]]:
    """{name: {nll, perplexity, accuracy, agreement, kl, acceptance, tokens}} for each model over `data` (an LMData),
    with decode also {bits_per_byte, bits_per_char, bytes, chars}.

    teacher: the key of the teacher in `models` (agreement and kl need it). vocab_size: compare only the first
    vocab_size logits (a padded vocabulary); None requires equal widths. on_batch(logits by name (B, T, V), labels)
    sees every batch's full logits, so that other measurements share these forward passes instead of repeating them.
    decode: the data's tokenizer as text_decoder(tokenizer); the text's size does not depend on the model, so it is
    counted once per block (predicted_text_size).
    """
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=data.collate)
    sums = {name: {"nll": 0.0, "correct": 0.0, "agree": 0.0, "kl": 0.0, "accept": 0.0} for name in models}
    tokens, size = 0, [0, 0]  # predicted tokens; (bytes, chars) of the text they cover
    with torch.inference_mode():
        for batch in loader:
            inputs, labels = batch.inputs.to(device), batch.labels.to(device)
            keep = labels[:, 1:] != -100
            rows, cols = keep.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            target = labels[rows, cols + 1]
            tokens += rows.numel()
            if decode is not None:
                for ids, row_labels in zip(batch.inputs.tolist(), batch.labels.tolist()):  # on the CPU
                    _, n_bytes, n_chars = predicted_text_size(ids, row_labels, decode)
                    size[0] += n_bytes
                    size[1] += n_chars
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
    if decode is not None and size[0] == 0:
        raise ValueError(f"lm_metrics: the {tokens} predicted tokens decode to no text; bits per byte need some")
    out = {}
    for name, s in sums.items():
        nll = s["nll"] / tokens
        out[name] = {
            "nll": nll,
            "perplexity": math.exp(min(nll, 700.0)),
            "accuracy": s["correct"] / tokens,
            "tokens": tokens,
        }
        if decode is not None:
            out[name] |= {"bits_per_byte": bits_per_unit(s["nll"], size[0]),
                          "bits_per_char": bits_per_unit(s["nll"], size[1]), "bytes": size[0], "chars": size[1]}
        if teacher is not None:
            out[name]["agreement"] = s["agree"] / tokens
            out[name]["kl"] = s["kl"] / tokens
            out[name]["acceptance"] = s["accept"] / tokens
    return out


def text_decoder(tokenizer) -> Decode:
    """A Hugging Face tokenizer's decode as the byte counts need it: special tokens (the end-of-document token)
    stand for no text, and spaces are left as they are (clean_up_tokenization_spaces would join " ." and change the
    count)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def predicted_text_size(ids: list[int], labels: list[int], decode: Decode) -> tuple[int, int, int]:
    """(tokens, bytes, chars): how many tokens of one block a causal LM predicts, and the size of the text they
    cover, in UTF-8 bytes and in characters.

    ids: the block's token ids (T,); labels: the same with −100 where nothing is predicted (padding, prompts).
    Position t is predicted when t ≥ 1 and labels[t] ≠ −100 (the first token of a block is context only), the
    positions lm_metrics scores.

    The text of a run of predicted positions [s, e) is what it adds to the decoded block:
    decode(ids[:e]) minus decode(ids[:s]). Decoding the whole prefix, not each token alone nor the run alone,
    keeps two kinds of tokenizer right: byte-fallback pieces (<0xE2> <0x82> <0xAC> are "€", 3 bytes, while each
    decoded alone is U+FFFD, 3 bytes each) and SentencePiece decoders that drop the leading space of the first
    piece they decode ("▁cat" alone decodes to "cat"). What stays approximate: a character cut by the block's
    first boundary (its first bytes in the unpredicted prefix) decodes there as U+FFFD, a few bytes off per block.
    """
    if len(ids) != len(labels):
        raise ValueError(f"predicted_text_size: {len(ids)} ids but {len(labels)} labels; expected one label per id")
    tokens = n_bytes = n_chars = 0
    t = 1
    while t < len(ids):
        if labels[t] == IGNORE:
            t += 1
            continue
        end = t
        while end < len(ids) and labels[end] != IGNORE:
            end += 1
        before, through = decode(ids[:t]), decode(ids[:end])
        tokens += end - t
        n_bytes += len(through.encode("utf-8")) - len(before.encode("utf-8"))
        n_chars += len(through) - len(before)
        t = end
    return tokens, n_bytes, n_chars


def bits_per_unit(nll_nats: float, units: int) -> float:
    """Summed negative log-likelihood in nats → bits per unit of text (byte or character): nll / ln 2 / units."""
    return nll_nats / math.log(2) / units


def _logits(out) -> torch.Tensor:
    return getattr(out, "logits", out)


def tokens_per_second(forward: Forward, inputs: torch.Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Forward throughput on a batch of token ids (B, T): B·T / median seconds per call."""
    from kdkit.evaluate.latency import throughput

    return throughput(forward, inputs, repeats, warmup) * inputs.shape[1]
