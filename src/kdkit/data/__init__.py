"""Data: built-in data sets that ship inside packages, arrays, tables, image folders and HF datasets.

The sources are literal registries: DATA_SOURCES (classification, kdkit.data.sources) and CORPUS_SOURCES
(language-model corpora, kdkit.data.lm); their keys are the values of `data.source`."""

from kdkit.data.bundle import DataBundle, TensorData, collate
from kdkit.data.sources import DATA_SOURCES, DataRequest, build_data
from kdkit.data.teacher_cache import TeacherCache

__all__ = ["DATA_SOURCES", "DataBundle", "DataRequest", "TensorData", "TeacherCache", "build_data", "collate"]
