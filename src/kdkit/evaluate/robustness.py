"""Robustness: accuracy of teacher, baseline and distilled student under input corruptions of growing strength.

Corruptions act on the inputs the models see, i.e. after kdkit's per-channel standardisation, so strengths are in
units of the normalised data: a noise std of 1.0 is as large as the data's own spread, and zero is the data mean.

Every corruption is a pure function (inputs, strength, generator) → new tensor, listed in the literal CORRUPTIONS
dict. Random draws come from a CPU torch.Generator and are then moved to the inputs' device, so a seed gives the
same corruption on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.registry import suggest


def gaussian_noise(inputs: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """inputs + N(0, strength²) elementwise. Any float tensor: images (B, C, H, W), tables (B, D), ..."""
    _require_float(inputs, "gaussian_noise")
    noise = torch.randn(inputs.shape, generator=generator, dtype=torch.float32)
    return inputs + (strength * noise).to(device=inputs.device, dtype=inputs.dtype)


def occlusion(inputs: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Zero (= the per-channel mean, the data being standardised) one box per example, in every channel.

    inputs: (B, C, H, W); strength: the fraction of the image area covered, in [0, 1]. The box has sides
    round(H·√strength) × round(W·√strength): a square on square images; on other images a box of the image's own
    aspect ratio, because a square of that area may not fit. Its position is uniform over the positions where it
    fits whole, drawn independently per example.
    """
    _require_images(inputs, "occlusion")
    _require_fraction(strength, "occlusion")
    batch, _, height, width = inputs.shape
    box_h, box_w = round(height * math.sqrt(strength)), round(width * math.sqrt(strength))
    if box_h == 0 or box_w == 0:
        return inputs.clone()
    top = torch.randint(0, height - box_h + 1, (batch, 1), generator=generator)
    left = torch.randint(0, width - box_w + 1, (batch, 1), generator=generator)
    rows = (torch.arange(height) >= top) & (torch.arange(height) < top + box_h)  # (B, H)
    cols = (torch.arange(width) >= left) & (torch.arange(width) < left + box_w)  # (B, W)
    box = (rows[:, :, None] & cols[:, None, :])[:, None].to(inputs.device)  # (B, 1, H, W)
    return inputs.masked_fill(box, 0)


def blur(inputs: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with sigma = strength pixels, each channel on its own (depthwise), shape preserved.

    inputs: (B, C, H, W) float. The kernel is separable with 2·ceil(3σ)+1 taps per axis, normalised to sum 1;
    sigma 0 returns the inputs unchanged. Borders are padded by replicating the edge pixels rather than reflecting:
    reflection needs the padding to be smaller than the image, which a σ = 2 kernel (radius 6) on an 8 × 8 image
    is not. The generator is unused (blur is deterministic); it is accepted so that every corruption has one shape.
    """
    _require_images(inputs, "blur")
    _require_float(inputs, "blur")
    if strength == 0:
        return inputs.clone()
    channels = inputs.shape[1]
    radius = math.ceil(3 * strength)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / strength) ** 2)
    taps = (taps / taps.sum()).to(device=inputs.device, dtype=torch.float32)
    # fp32 throughout: half-precision convolutions are missing on some CPUs and round the taps' small tails away.
    x = F.pad(inputs.float(), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)  # along W
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)  # along H
    return x.to(inputs.dtype)


def token_dropout(
    inputs: torch.Tensor,
    strength: float,
    generator: torch.Generator,
    mask_id: int = 0,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Replace a `strength` fraction of each sequence's non-padding tokens with `mask_id` (a mask or unk token).

    inputs: (B, T) integer token ids. In each row exactly round(strength · n) of its n non-pad tokens are replaced,
    chosen uniformly without replacement; tokens equal to `pad_id` are never touched (pad_id None: no padding).
    """
    if inputs.ndim != 2 or inputs.dtype.is_floating_point or inputs.dtype.is_complex or inputs.dtype == torch.bool:
        raise ValueError(
            f"token_dropout needs integer token ids of shape (B, T), got shape {tuple(inputs.shape)} {inputs.dtype}"
        )
    _require_fraction(strength, "token_dropout")
    real = torch.ones(inputs.shape, dtype=torch.bool) if pad_id is None else (inputs != pad_id).cpu()
    # A random rank among the row's real tokens: pads score above every uniform draw, so they rank last.
    scores = torch.rand(inputs.shape, generator=generator).masked_fill(~real, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    quota = torch.round(strength * real.sum(dim=1, keepdim=True)).long()  # (B, 1); round half to even
    dropped = (ranks < quota) & real
    return inputs.masked_fill(dropped.to(inputs.device), mask_id)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "occlusion": occlusion,
    "blur": blur,
    "token_dropout": token_dropout,
}


def corrupt(inputs: torch.Tensor, kind: str, strength: float, seed: int, **options: Any) -> torch.Tensor:
    """A corrupted copy of `inputs` (the same shape, dtype and device); the same seed gives the same copy.

    kind: a key of CORRUPTIONS; strength ≥ 0, in the corruption's own unit (noise std, area fraction, blur sigma in
    pixels, fraction of tokens); options: extra keyword arguments of that corruption (token_dropout's mask_id and
    pad_id). Raises ValueError for an unknown kind, a negative strength, or inputs of a shape the corruption does not
    apply to (image corruptions need (B, C, H, W)).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {kind!r}{suggest(kind, CORRUPTIONS)}; expected one of: {', '.join(CORRUPTIONS)}"
        )
    strength = float(strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"{kind}: strength must be a finite number ≥ 0, got {strength}")
    generator = torch.Generator().manual_seed(seed)
    return CORRUPTIONS[kind](inputs, strength, generator, **options)


def default_corruptions(input_shape: Sequence[int], is_token_ids: bool = False) -> list[tuple[str, list[float]]]:
    """The corruptions and strengths that suit one example of shape `input_shape` (no batch dimension).

    (C, H, W) images: noise, occlusion and blur; token ids: token dropout; anything else (feature vectors): noise.
    """
    if is_token_ids:
        return [("token_dropout", [0.1, 0.2, 0.4])]
    if len(input_shape) == 3:
        return [("gaussian_noise", [0.25, 0.5, 1.0]), ("occlusion", [0.1, 0.25, 0.5]), ("blur", [0.5, 1.0, 2.0])]
    return [("gaussian_noise", [0.25, 0.5, 1.0])]


@torch.inference_mode()
def robustness(
    models: dict[str, list[Callable[[torch.Tensor], Any]]],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    corruptions: list[tuple[str, list[float]]],
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    **options: Any,
) -> dict:
    """Top-1 accuracy of every model on clean inputs and on every (corruption, strength).

    models: model key ("teacher", "baseline_student", "student") → one forward per seed (a model or a teacher;
    it returns logits (B, C) or an object with .logits). Keys with no forwards are left out. nn.Modules are put in
    eval mode for the evaluation and given back in the mode they came in.
    inputs: the whole evaluation set, (N, ...) as the models take it (normalised); labels: (N,) class indices.
    corruptions: [(kind, [strength, ...]), ...], e.g. from default_corruptions. Strength 0 is the clean inputs,
    evaluated once under "clean" and left out of the kinds.
    seed: every (kind, strength) is corrupted with this seed, so each corruption draws the same random numbers at
    every strength (the noise at σ = 1 is twice that at σ = 0.5): curves over strength differ by strength alone.
    The whole set is corrupted once, then every model and seed is evaluated on that same copy, batch_size rows at
    a time on `device`; the result does not depend on batch_size. options go to every corruption (token_dropout's
    mask_id, pad_id).

    Returns a JSON-serialisable dict:
      {"clean": {model: entry}, "<kind>": {"<strength>": {model: entry}, ...}, ...}
    with strengths as str(float(s)) ("0.5", "1.0") and
      entry = {"mean": accuracy averaged over seeds, "std": population std (ddof=0; 0.0 for one seed),
               "per_seed": [accuracy of each forward, in order],
               "drop": mean over seeds of (clean − corrupted accuracy), paired seed by seed,
               "drop_std": population std of those differences}.
    Accuracies are fractions in [0, 1]. "drop" answers "does distillation make students more robust" without the
    clean accuracy confounding it: a student that is simply better on clean data need not lose less. Clean entries
    have no drop.
    """
    models = {name: list(forwards) for name, forwards in models.items() if forwards}
    if labels.ndim != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"labels must be (N,) with N={inputs.shape[0]}, got shape {tuple(labels.shape)}")
    labels = labels.detach().long().cpu()
    for kind, strengths in corruptions:  # fail on a bad kind, strength or shape before evaluating anything
        for strength in strengths:
            corrupt(inputs[:1], kind, strength, seed, **options)
    training = {id(f): f.training for fs in models.values() for f in fs if isinstance(f, torch.nn.Module)}
    for forwards in models.values():
        for forward in forwards:
            if isinstance(forward, torch.nn.Module):
                forward.eval()
    try:
        clean = {name: [_accuracy(f, inputs, labels, batch_size, device) for f in fs] for name, fs in models.items()}
        result: dict = {"clean": {name: _entry(per_seed) for name, per_seed in clean.items()}}
        for kind, strengths in corruptions:
            by_strength = result.setdefault(kind, {})
            for strength in sorted({float(s) for s in strengths} - {0.0}):
                corrupted = corrupt(inputs, kind, strength, seed, **options)
                by_strength[str(strength)] = {
                    name: _entry([_accuracy(f, corrupted, labels, batch_size, device) for f in fs], clean[name])
                    for name, fs in models.items()
                }
    finally:
        for forwards in models.values():
            for forward in forwards:
                if isinstance(forward, torch.nn.Module):
                    forward.train(training[id(forward)])
    return result


def _accuracy(
    forward: Callable[[torch.Tensor], Any],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: str | torch.device,
) -> float:
    correct = 0
    for start in range(0, inputs.shape[0], batch_size):
        out = forward(inputs[start : start + batch_size].to(device))
        logits = getattr(out, "logits", out)  # (b, C)
        correct += int((logits.argmax(dim=-1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(inputs.shape[0], 1)


def _entry(per_seed: list[float], clean: list[float] | None = None) -> dict:
    values = np.array(per_seed, dtype=np.float64)
    entry = {"mean": float(values.mean()), "std": float(values.std(ddof=0)), "per_seed": [float(v) for v in values]}
    if clean is not None:
        drops = np.array(clean, dtype=np.float64) - values
        entry["drop"], entry["drop_std"] = float(drops.mean()), float(drops.std(ddof=0))
    return entry


def _require_images(inputs: torch.Tensor, kind: str) -> None:
    if inputs.ndim != 4:
        raise ValueError(f"{kind} is an image corruption: it needs inputs (B, C, H, W), got {tuple(inputs.shape)}")


def _require_float(inputs: torch.Tensor, kind: str) -> None:
    if not inputs.dtype.is_floating_point:
        raise ValueError(f"{kind} needs float inputs, got {inputs.dtype} of shape {tuple(inputs.shape)}")


def _require_fraction(strength: float, kind: str) -> None:
    if not 0 <= strength <= 1:
        raise ValueError(f"{kind}: strength is a fraction, it must lie in [0, 1], got {strength}")
