"""Interpretable students and tabular teachers: distil a model or an ensemble into one a person can read.

    from kdkit.interpret import interpret_run, predict_table
    metrics = interpret_run("configs/interpret/tabular_wine.yaml")   # writes the run directory
    probs = predict_table(metrics["run_dir"], new_rows_frame)

config.py (InterpretConfig, no torch, no scikit-learn) → tabular.py (reading, the encoder) → teachers.py →
neighbourhood.py (synthetic points) → students.py (STUDENTS) → fidelity.py → report.py → run.py; predict.py reads
a run directory back. Names are resolved lazily, so validating a config imports neither scikit-learn nor plots.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "InterpretConfig": "kdkit.interpret.config",
    "load_interpret_config": "kdkit.interpret.config",
    "interpret_run": "kdkit.interpret.run",
    "load_run": "kdkit.interpret.predict",
    "predict_table": "kdkit.interpret.predict",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdkit.interpret' has no attribute {name!r}")
