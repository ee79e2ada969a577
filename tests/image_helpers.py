"""Images for the serving tests: a PNG of an image, and a data set's normalised inputs back to the pixels it stores
(tests/unit/serve/test_raw_inputs.py, tests/unit/serve/test_serve_int8.py, tests/vision/test_real_networks.py)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def png(pixels: np.ndarray) -> bytes:
    """The PNG file of an image array as PIL's Image.fromarray reads it: (H, W) grey or (H, W, 3) RGB uint8, …"""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def stored_pixels(x: torch.Tensor, description: dict) -> np.ndarray:
    """Training inputs (B, C, H, W) back to the 8-bit pixels the data set stores (B, C, H, W) uint8, using the
    recorded preprocessing (description: mean, std, scale), with the check that they are whole numbers (a wrong
    mean, std or scale would leave fractions)."""
    mean = np.asarray(description["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(description["std"], dtype=np.float64).reshape(-1, 1, 1)
    values = (x.double().numpy() * std + mean) * description["scale"]
    assert np.abs(values - np.rint(values)).max() < 1e-3
    return np.rint(values).astype(np.uint8)
