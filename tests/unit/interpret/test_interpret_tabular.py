"""Reading and encoding tables, and the synthetic neighbourhood: round trips, missing values, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kdkit.errors import ConfigError, DataError
from kdkit.interpret.config import TabularDataConfig, load_interpret_config
from kdkit.interpret.neighbourhood import sample_codes
from kdkit.interpret.tabular import (
    MISSING_LEVEL,
    TabularEncoder,
    encode_target,
    load_frame,
    select_columns,
)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30, 45, np.nan, 60, 25, 38],
            "income": [1.5, 2.0, 3.5, np.nan, 0.5, 2.5],
            "colour": ["red", "blue", "red", None, "green", "blue"],
            "member": [True, False, True, True, False, False],
            "y": ["no", "yes", "no", "yes", "no", "yes"],
        }
    )


def _fit(frame: pd.DataFrame, encoding: str = "onehot", unseen: str = "other") -> TabularEncoder:
    data = TabularDataConfig(source="csv", path="x.csv", target="y", encoding=encoding, unseen_category=unseen)
    _, numeric, categorical = select_columns(frame, data)
    _, names, _ = encode_target(frame, "y")
    return TabularEncoder.fit(frame, "y", names, numeric, categorical, encoding, "median", unseen)


@pytest.mark.parametrize("encoding", ["onehot", "ordinal"])
def test_encoder_round_trips_through_json(encoding):
    frame = _frame()
    enc = _fit(frame, encoding)
    again = TabularEncoder.from_json(json.loads(json.dumps(enc.to_json())))
    assert np.array_equal(enc.transform(frame), again.transform(frame))
    assert again.feature_names == enc.feature_names
    # numbers first (age, income), then categories: bool and text columns are categorical
    assert [c.name for c in enc.numeric] == ["age", "income"]
    assert [c.name for c in enc.categorical] == ["colour", "member"]
    if encoding == "onehot":
        assert "colour=red" in enc.feature_names and f"colour={MISSING_LEVEL}" in enc.feature_names
        x = enc.transform(frame)
        block = x[:, enc.feature_names.index("colour=blue") : enc.feature_names.index("colour=red") + 1]
        assert np.all(block.sum(axis=1) <= 1)
    else:
        assert enc.feature_names == ["age", "income", "colour", "member"]
    # codes → raw frame → codes is the identity (the neighbourhood relies on it for raw-input teachers)
    num, cat = enc.codes(frame)
    num2, cat2 = enc.codes(enc.frame(num, cat))
    assert np.allclose(num, num2) and np.array_equal(cat, cat2)


def test_missing_values_are_imputed_and_recorded():
    frame = _frame()
    enc = _fit(frame)
    age = enc.numeric[0]
    assert age.missing == 1 and age.fill == pytest.approx(np.median([30, 45, 60, 25, 38]))
    num, cat = enc.codes(frame)
    assert num[2, 0] == pytest.approx(age.fill) and not np.isnan(num).any()
    assert enc.categorical[0].levels[-1] == MISSING_LEVEL  # a missing category is its own level, last
    assert enc.to_json()["numeric"][0]["fill"] == pytest.approx(age.fill)


def test_unseen_category_goes_to_other_bucket_or_fails():
    frame = _frame()
    new = frame.iloc[:1].copy()
    new["colour"] = "purple"
    onehot = _fit(frame, "onehot")
    x = onehot.transform(new)
    colour = [i for i, n in enumerate(onehot.feature_names) if n.startswith("colour=")]
    assert np.all(x[0, colour] == 0)  # the "other" bucket: no colour column set
    ordinal = _fit(frame, "ordinal")
    assert ordinal.transform(new)[0, 2] == len(ordinal.categorical[0].levels)
    with pytest.raises(DataError, match="never seen in training: 'purple'"):
        _fit(frame, "onehot", unseen="error").transform(new)


def test_unknown_columns_list_the_columns_found():
    frame = _frame()
    data = TabularDataConfig(source="csv", path="x.csv", target="y", features=["age", "incme"])
    with pytest.raises(DataError) as err:
        select_columns(frame, data)
    text = str(err.value)
    assert "'incme'" in text and "did you mean: income" in text
    assert "columns found: age, income, colour, member, y" in text
    with pytest.raises(DataError, match="data.target: unknown column"):
        select_columns(frame, TabularDataConfig(source="csv", path="x.csv", target="label"))


def test_one_class_target_is_an_error():
    frame = _frame().assign(y="yes")
    with pytest.raises(DataError, match="one class"):
        encode_target(frame, "y")


def test_data_the_encoder_cannot_read_is_an_error():
    frame = _frame()
    data = TabularDataConfig(source="csv", path="x.csv", target="y", numeric=["colour"])
    _, numeric, categorical = select_columns(frame, data)
    with pytest.raises(DataError, match="'colour' is read as numbers but holds values that are not numbers"):
        TabularEncoder.fit(frame, "y", ["no", "yes"], numeric, categorical)
    ids = frame.assign(note=[f"free text {i}" for i in range(len(frame))])
    with pytest.raises(DataError, match="cannot read it as a category"):
        TabularEncoder.fit(ids, "y", ["no", "yes"], [], ["note"], max_levels=3)
    nested = frame.assign(tags=[[1], [2], [3], [4], [5], [6]])
    with pytest.raises(DataError, match="holds list values"):
        TabularEncoder.fit(nested, "y", ["no", "yes"], [], ["tags"])


def test_tree_limit_that_is_not_positive_is_a_config_error():
    with pytest.raises(ConfigError, match=r"student\.tree\.max_depth: got 0; input should be greater than 0"):
        load_interpret_config({"student": {"tree": {"max_depth": 0}}})
    with pytest.raises(ConfigError, match="unlimited tree is not readable"):
        load_interpret_config({"student": {"tree": {"max_depth": None}}})
    with pytest.raises(
        ConfigError,
        match=r"teacher\.members\.0\.kind: unknown teacher kind 'random_forrest' "
        r"\(did you mean: random_forest",
    ):
        load_interpret_config({"teacher": {"members": [{"kind": "random_forrest"}]}})
    with pytest.raises(ConfigError, match=r"neighbourhod: unknown key \(did you mean: neighbourhood\?\)"):
        load_interpret_config({"neighbourhod": {}})


def test_builtin_table_and_csv_read_the_same(tmp_path):
    frame = load_frame(TabularDataConfig(source="builtin", name="wine"))
    assert frame.shape == (178, 14) and set(frame["target"]) == {"class_0", "class_1", "class_2"}
    path = tmp_path / "wine.csv"
    frame.to_csv(path, index=False)
    again = load_frame(TabularDataConfig(source="csv", path=str(path)))
    assert list(again.columns) == list(frame.columns) and np.allclose(again["alcohol"], frame["alcohol"])


def test_builtin_digits_come_from_kdkit_data_as_scikit_learn_shows_them():
    """digits is defined once (kdkit.data.builtin); the table is scikit-learn's frame, value for value."""
    from sklearn.datasets import load_digits

    frame = load_frame(TabularDataConfig(source="builtin", name="digits"))
    expected = load_digits(as_frame=True).frame
    assert list(frame.columns) == list(expected.columns)
    assert np.array_equal(frame.to_numpy(), expected.to_numpy())


def test_overrides_reach_defaults_not_written_in_the_yaml():
    cfg = load_interpret_config({"kind": "interpret"}, ("neighbourhood.eval_points=7", "run.device=auto"))
    assert cfg.neighbourhood.eval_points == 7 and cfg.run.device == "auto"
    with pytest.raises(ConfigError, match=r"run\.device: got 'gpu'"):
        load_interpret_config({}, ("run.device=gpu",))


@pytest.mark.parametrize("method", ["perturb", "uniform"])
def test_neighbourhood_stays_within_ranges_and_observed_categories(method):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "x": rng.normal(0, 1, 200),
            "count": rng.integers(0, 10, 200),
            "c": rng.choice(["a", "b", "c"], 200),
            "y": rng.choice(["p", "q"], 200),
        }
    )
    enc = _fit(frame)
    num, cat = enc.codes(frame)
    # a test row with an unseen category and a value outside the range: points around it still stay inside
    extra = pd.DataFrame({"x": [50.0], "count": [3], "c": ["zzz"], "y": ["p"]})
    num_e, cat_e = enc.codes(extra)
    num = np.vstack([num, num_e])
    cat = np.vstack([cat, cat_e])
    s_num, s_cat = sample_codes(enc, num, cat, 3000, method, scale=2.0, category_resample=0.3, seed=1)
    assert s_num.shape == (3000, 2) and s_cat.shape == (3000, 1)
    for j, col in enumerate(enc.numeric):
        assert s_num[:, j].min() >= col.low and s_num[:, j].max() <= col.high
    assert np.all(s_num[:, 1] == np.round(s_num[:, 1]))  # whole-number column stays whole
    assert set(np.unique(s_cat[:, 0])) <= set(range(len(enc.categorical[0].levels)))
    assert len(np.unique(s_num[:, 0])) > 100  # and the points do spread out


def test_arrays_source_reads_embeddings_as_numeric_columns(tmp_path):
    path = tmp_path / "emb.npz"
    np.savez(path, x=np.arange(24, dtype=np.float32).reshape(4, 2, 3), y=np.array([0, 1, 0, 1]))
    frame = load_frame(TabularDataConfig(source="arrays", path=str(path)))
    assert list(frame.columns) == [f"x{i}" for i in range(6)] + ["target"]
    _, numeric, categorical = select_columns(frame, TabularDataConfig(source="arrays", path=str(path)))
    assert len(numeric) == 6 and not categorical


def test_hf_datasets_source_reads_a_local_csv_like_pandas(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    data = TabularDataConfig(source="hf", name="csv", data_files=str(path), target="y")
    frame = load_frame(data)
    _, numeric, categorical = select_columns(frame, data)
    assert numeric == ["age", "income"] and categorical == ["colour", "member"]
    enc = TabularEncoder.fit(frame, "y", ["no", "yes"], numeric, categorical)
    assert np.allclose(enc.transform(frame), _fit(_frame()).transform(_frame()))


def test_frame_sources_are_exactly_the_config_literal():
    """A literal registry: a tabular source cannot be added in the config without its loader, or the reverse."""
    import typing

    from kdkit.interpret.config import TabularDataConfig
    from kdkit.interpret.tabular import FRAME_SOURCES

    assert set(FRAME_SOURCES) == set(typing.get_args(TabularDataConfig.model_fields["source"].annotation))
