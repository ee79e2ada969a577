"""Feature wiring for feature losses, shared by every task that trains torch students: resolve layer names
against the real models, tap student and teacher by module path, and let the losses build their adapters from the
tapped shapes (before the optimizer is made, so that the adapters train with the student)."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import ConfigError
from kdkit.losses import WeightedLoss
from kdkit.teachers import TeacherEnsemble


def wire_features(loss: WeightedLoss, student: nn.Module, teacher: TeacherEnsemble, example: torch.Tensor,
                  device: str, cached_teacher: bool):
    """FeatureTaps on the student (the teacher is tapped in place), or None when no loss reads features."""
    loss.resolve(student, [m.model for m in teacher.members])
    student_paths, teacher_paths = loss.feature_paths()
    if not student_paths and not teacher_paths:
        return None
    if cached_teacher:
        raise ConfigError(
            "distill.cache_teacher: true, but feature losses need the live teacher's activations "
            f"({', '.join(teacher_paths)}); the cache stores outputs only: set cache_teacher: false"
        )
    from kdkit.models.taps import FeatureTaps

    taps = FeatureTaps(student, student_paths, "student.model")
    teacher.tap(teacher_paths, "teacher")
    was_training = student.training
    student.eval()
    with torch.no_grad():
        student(example)
    student.train(was_training)
    student_shapes = {k: v.shape[1:] for k, v in taps.collect().items()}
    teacher_shapes = {k: v.shape[1:] for k, v in teacher(example.to(device)).features.items()}
    loss.setup(student_shapes, teacher_shapes)
    return taps
