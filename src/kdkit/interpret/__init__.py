"""Interpretable students and tabular teachers: the parts of the tabular task (kdkit.tasks.tabular), which runs
through the one pipeline like every task:

    from kdkit.pipeline import distill
    from kdkit.interpret import predict_table
    result = distill("configs/interpret/tabular_wine.yaml")    # `kdkit interpret` / `kdkit train`: the run directory
    probs = predict_table(result.run_dir, new_rows_frame)      # the kept student, from RUN_DIR/student

config.py (InterpretConfig, no torch, no scikit-learn) → tabular.py (reading, the encoder) → teachers.py →
neighbourhood.py (synthetic points) → students.py (STUDENTS) → auto.py (student.auto: the setting chosen on
validation folds, labels alone among the candidates) → fidelity.py → predict.py (a fitted student with its
encoder, its folder) → report.py. Names are resolved lazily, so validating a config imports neither scikit-learn
nor plots.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "InterpretConfig": "kdkit.interpret.config",
    "load_interpret_config": "kdkit.interpret.config",
    "FittedStudent": "kdkit.interpret.predict",
    "load_run": "kdkit.interpret.predict",
    "predict_table": "kdkit.interpret.predict",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdkit.interpret' has no attribute {name!r}")
