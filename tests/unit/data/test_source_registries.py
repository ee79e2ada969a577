"""The data-source registries name exactly the values `data.source` accepts, so a source cannot be added (or
removed) in one place only; dispatch goes through them."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from kdkit.config import DataConfig
from kdkit.data import DATA_SOURCES, build_data
from kdkit.data.builtin import BUILTIN_DATASETS
from kdkit.data.lm import CORPORA, CORPUS_SOURCES, build_lm_data
from kdkit.errors import ConfigError, DataError

SOURCES = typing.get_args(DataConfig.model_fields["source"].annotation)


def test_data_sources_are_exactly_the_config_values():
    assert len(SOURCES) == 7
    assert sorted(DATA_SOURCES) == sorted(SOURCES)


def test_corpus_sources_are_exactly_the_config_values():
    assert sorted(CORPUS_SOURCES) == sorted(SOURCES)


def test_builtin_names_cover_the_classification_data_sets():
    assert {"mnist5k", "digits", "bbc_news"} <= set(BUILTIN_DATASETS)
    assert set(CORPORA) == {"shakespeare", "bbc_news"}


def test_build_data_dispatches_through_the_registry(monkeypatch):
    seen = []
    monkeypatch.setitem(DATA_SOURCES, "csv", lambda req: seen.append(req) or "bundle")
    assert build_data("csv", path="t.csv", label_column="y", extra_train=["a.npz"]) == "bundle"
    (req,) = seen
    assert (req.source, req.path, req.label_column, req.extra_train) == ("csv", "t.csv", "y", ("a.npz",))


def test_an_unknown_source_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"data.source: unknown name 'cvs' \(did you mean: csv"):
        build_data("cvs", path="t.csv")
    with pytest.raises(ConfigError, match=r"data.source: unknown name 'text_folders' \(did you mean: text_folder"):
        build_lm_data("text_folders", None, "x", None, None, None, 8, 0.1, 0.2, 0, None)


@pytest.mark.parametrize("source", ["arrays", "csv", "parquet", "image_folder"])
def test_sources_without_text_are_refused_for_causal_lm(source):
    with pytest.raises(DataError, match=rf"data.source: '{source}' holds no text; for causal_lm use builtin"):
        build_lm_data(source, None, "x", None, None, None, 8, 0.1, 0.2, 0, None)


def test_extra_npz_examples_with_text_data_are_refused_not_ignored(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            (tmp_path / cls / f"{i}.txt").write_text(f"{cls} text {i}")
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 4), np.float32), y=np.array([0]))
    with pytest.raises(DataError, match=r"data.extra_train: .*source 'text_folder' holds texts"):
        build_data("text_folder", path=str(tmp_path), tokenizer="unused", extra_train=[str(tmp_path / "x.npz")])
