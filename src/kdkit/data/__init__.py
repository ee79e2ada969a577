"""Data: built-in data sets that ship inside packages, arrays, tables, image folders and HF datasets."""

from kdkit.data.bundle import DataBundle, TensorData, build_data, collate
from kdkit.data.teacher_cache import TeacherCache

__all__ = ["DataBundle", "TensorData", "TeacherCache", "build_data", "collate"]
