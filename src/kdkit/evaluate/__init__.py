"""Evaluation: quality metrics (metrics.py), cost measurements (latency.py) and robustness to input corruptions
(robustness.py). Imports no engine or pipeline."""

from __future__ import annotations

from kdkit.evaluate.latency import footprint, latency_ms, throughput
from kdkit.evaluate.metrics import classification_metrics, confusion, gain, reliability, summarize_seeds
from kdkit.evaluate.robustness import CORRUPTIONS, corrupt, default_corruptions, robustness

__all__ = [
    "classification_metrics",
    "confusion",
    "reliability",
    "summarize_seeds",
    "gain",
    "footprint",
    "latency_ms",
    "throughput",
    "robustness",
    "corrupt",
    "default_corruptions",
    "CORRUPTIONS",
]
