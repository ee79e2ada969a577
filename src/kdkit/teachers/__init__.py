"""Teachers: one frozen model, or a weighted ensemble that returns the same ModelOutputs."""

from kdkit.teachers.ensemble import TeacherEnsemble
from kdkit.teachers.teacher import Teacher, fold_batchnorm

__all__ = ["Teacher", "TeacherEnsemble", "fold_batchnorm"]
