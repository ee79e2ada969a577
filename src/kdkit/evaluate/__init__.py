"""Evaluation: quality metrics (metrics.py) and cost measurements (latency.py). Imports no engine or pipeline."""

from __future__ import annotations

from kdkit.evaluate.latency import footprint, latency_ms, throughput
from kdkit.evaluate.metrics import classification_metrics, confusion, gain, reliability, summarize_seeds

__all__ = [
    "classification_metrics",
    "confusion",
    "reliability",
    "summarize_seeds",
    "gain",
    "footprint",
    "latency_ms",
    "throughput",
]
