"""Evaluation: quality metrics (metrics.py, lm.py), cost measured one way for every model (cost.py over
latency.py), robustness to input corruptions (robustness.py), and the metrics.json schema (schema.py).
Imports no engine or pipeline.

Names are loaded on first use (PEP 562): `import kdkit.evaluate.schema` (what the report reads) then costs no
torch, scikit-learn or torchmetrics import, while `from kdkit.evaluate import footprint` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "classification_metrics": "metrics",
    "confusion": "metrics",
    "reliability": "metrics",
    "summarize_seeds": "metrics",
    "gain": "metrics",
    "footprint": "latency",
    "latency_ms": "latency",
    "throughput": "latency",
    "measure_cost": "cost",
    "with_speedups": "schema",
    "assemble": "schema",
    "model_entry": "schema",
    "paired_gain": "schema",
    "check_metrics": "schema",
    "mean_of": "schema",
    "std_of": "schema",
    "per_seed_of": "schema",
    "robustness": "robustness",
    "corrupt": "robustness",
    "default_corruptions": "robustness",
    "CORRUPTIONS": "robustness",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kdkit.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kdkit.evaluate.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
