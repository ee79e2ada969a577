"""Synthetic points around the data (a transfer set), drawn in code space so they stay plausible.

Numbers stay within the training range of their column (and are whole numbers where the column's training values
all are); categories are always levels observed in training, drawn in their training proportions. The teacher
labels these points; the student learns from the teacher on them, which lets it follow the teacher where real
rows are few (Craven & Shavlik's TREPAN, 1996; Bucila et al., Model compression, 2006).
"""

from __future__ import annotations

import numpy as np

from kdkit.interpret.tabular import TabularEncoder


def sample_codes(
    encoder: TabularEncoder,
    num: np.ndarray,
    cat: np.ndarray,
    n: int,
    method: str = "perturb",
    scale: float = 0.3,
    category_resample: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`n` synthetic points as codes (numbers (n, P), category codes (n, Q)), around the rows (num, cat).

    perturb: a random row + N(0, (scale · column std)²) per number, clipped to the training range; each category
    redrawn from the observed levels with probability category_resample. uniform: every column drawn on its own,
    numbers uniformly in the training range, categories by training frequency (ignores the rows).
    """
    rng = np.random.default_rng(seed)
    p, q = len(encoder.numeric), len(encoder.categorical)
    if n == 0:
        return np.zeros((0, p)), np.zeros((0, q), dtype=np.int64)
    low = np.array([c.low for c in encoder.numeric])
    high = np.array([c.high for c in encoder.numeric])
    if method == "perturb":
        if len(num) == 0:
            raise ValueError("perturb needs at least one row to perturb")
        rows = rng.integers(0, len(num), n)
        std = np.array([c.std for c in encoder.numeric])
        out_num = num[rows] + rng.standard_normal((n, p)) * std * scale
        out_cat = cat[rows].copy()
        redraw = rng.random((n, q)) < category_resample
    elif method == "uniform":
        out_num = low + rng.random((n, p)) * (high - low)
        out_cat = np.zeros((n, q), dtype=np.int64)
        redraw = np.ones((n, q), dtype=bool)
    else:
        raise ValueError(f"unknown neighbourhood method {method!r}; expected perturb or uniform")
    out_num = np.clip(out_num, low, high)
    whole = np.array([c.integer for c in encoder.numeric], dtype=bool)
    out_num[:, whole] = np.round(out_num[:, whole])
    for j, c in enumerate(encoder.categorical):
        # A row in the "other" bucket (a category unseen in training) is always redrawn to an observed level.
        redraw_j = redraw[:, j] | (out_cat[:, j] >= len(c.levels))
        share = np.asarray(c.counts, dtype=np.float64) / sum(c.counts)
        out_cat[redraw_j, j] = rng.choice(len(c.levels), size=int(redraw_j.sum()), p=share)
    return out_num, out_cat.astype(np.int64)
