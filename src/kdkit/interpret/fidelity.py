"""How faithful a student is to its teacher, and how accurate either is, from plain arrays.

These are small on purpose and need no torch: kdkit.evaluate.metrics works on torch logits and imports torch and
torchmetrics (8–11 s on a 2-core machine), which would be most of the run time of a tabular run.
"""

from __future__ import annotations

import math

import numpy as np


def fidelity(teacher_pred: np.ndarray, student_pred: np.ndarray, class_names: list[str]) -> dict:
    """Agreement of the student's top class with the teacher's, overall and per class of the teacher.

    Returns {"agreement": share of points where they agree, "n": points, "per_class": {class: {"n": points the
    teacher puts in that class, "agreement": share of those the student puts there too (NaN when n is 0)}}}.
    """
    teacher_pred, student_pred = np.asarray(teacher_pred), np.asarray(student_pred)
    if teacher_pred.shape != student_pred.shape or teacher_pred.ndim != 1:
        raise ValueError(f"predictions of shapes {teacher_pred.shape} and {student_pred.shape}; expected (N,) both")
    same = teacher_pred == student_pred
    per_class = {}
    for k, name in enumerate(class_names):
        mask = teacher_pred == k
        per_class[name] = {"n": int(mask.sum()), "agreement": float(same[mask].mean()) if mask.any() else math.nan}
    return {"agreement": float(same.mean()) if same.size else math.nan, "n": int(same.size), "per_class": per_class}


def quality(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, macro F1 over all classes, and log loss of predicted class probabilities (N, C) against labels."""
    from sklearn.metrics import f1_score

    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {
        "accuracy": float((pred == labels).mean()),
        "f1_macro": float(f1_score(labels, pred, labels=list(range(probs.shape[1])), average="macro", zero_division=0)),
        "nll": float(-np.log(picked).mean()),
    }
