"""Predict with a saved interpret run: encoder.json + student.json, no scikit-learn object and no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdkit.errors import DataError
from kdkit.interpret.students import predict_json
from kdkit.interpret.tabular import TabularEncoder


def load_run(run_dir: str | Path) -> tuple[TabularEncoder, dict]:
    """(encoder, student spec) of a run directory written by `kdkit interpret` / `kdkit demo tabular`."""
    run_dir = Path(run_dir)
    parts = []
    for name in ("encoder.json", "student.json"):
        path = run_dir / name
        if not path.is_file():
            raise DataError(f"{run_dir}: no {name}; expected a run directory written by kdkit interpret")
        try:
            parts.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    return TabularEncoder.from_json(parts[0]), parts[1]


def predict_table(run_dir: str | Path, frame) -> np.ndarray:
    """Class probabilities (N, C) of the run's student for a DataFrame with the feature columns (the target column
    may be there or not), encoded exactly as in training. Class order: the run's encoder.json class_names."""
    encoder, spec = load_run(run_dir)
    return predict_json(spec, encoder.transform(frame))
