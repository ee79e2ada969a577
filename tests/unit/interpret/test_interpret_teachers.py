"""Tabular teachers: trained from the config, soft voting, kdkit's MLP, and fitted models loaded with skops."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from kdkit.errors import CompatibilityError, ConfigError
from kdkit.interpret.config import TabularDataConfig, TabularTeacherConfig
from kdkit.interpret.tabular import TabularEncoder, encode_target, load_frame, select_columns
from kdkit.interpret.teachers import build_teacher, check_teacher, load_skops, save_skops


@pytest.fixture(scope="module")
def wine():
    data = TabularDataConfig(source="builtin", name="wine")
    frame = load_frame(data)
    _, numeric, categorical = select_columns(frame, data)
    y, names, _ = encode_target(frame, "target")
    enc = TabularEncoder.fit(frame, "target", names, numeric, categorical)
    num, cat = enc.codes(frame)
    return frame, enc, num, cat, y


def _teacher(members: list[dict]) -> TabularTeacherConfig:
    return TabularTeacherConfig.model_validate({"members": members})


def test_soft_voting_is_the_weighted_mean_of_the_members(wine):
    _, enc, num, cat, y = wine
    section = _teacher(
        [
            {"kind": "random_forest", "params": {"n_estimators": 10}, "weight": 3},
            {"kind": "extra_trees", "params": {"n_estimators": 10}, "weight": 1},
        ]
    )
    teacher, trained = build_teacher(section, enc, seed=0)
    teacher.fit(num, cat, y, trained)
    p = teacher.proba(num, cat)
    a, b = (m.proba(num, cat) for m in teacher.members)
    assert np.allclose(p, 0.75 * a + 0.25 * b) and np.allclose(p.sum(axis=1), 1)
    assert (p.argmax(1) == y).mean() > 0.95


def test_teacher_params_are_checked_against_the_signature():
    with pytest.raises(
        ConfigError,
        match=r"teacher\.members\.0\.params\.n_estimator: unknown parameter "
        r"\(did you mean: n_estimators",
    ):
        check_teacher(_teacher([{"kind": "gradient_boosting", "params": {"n_estimator": 5}}]))
    with pytest.raises(ConfigError, match="random_state: set by kdkit"):
        check_teacher(_teacher([{"kind": "random_forest", "params": {"random_state": 1}}]))
    with pytest.raises(ConfigError, match="device: set by kdkit"):  # run.device says where an mlp trains
        check_teacher(_teacher([{"kind": "mlp", "params": {"device": "cuda"}}]))


def test_mlp_teacher_trains_with_kdkit_engine(wine):
    _, enc, num, cat, y = wine
    section = _teacher([{"kind": "mlp", "params": {"hidden": [16], "epochs": 15, "batch_size": 32}}])
    teacher, trained = build_teacher(section, enc, seed=0)
    teacher.fit(num, cat, y, trained)
    p = teacher.proba(num, cat)
    assert p.shape == (len(y), 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert (p.argmax(1) == y).mean() > 0.85


def test_skops_teacher_round_trip_and_untrusted_types(tmp_path, wine):
    pytest.importorskip("skops")
    from sklearn.ensemble import GradientBoostingClassifier

    _, enc, num, cat, y = wine
    # fit on the class names, as kdkit does for the teachers it trains and saves under teacher/
    model = GradientBoostingClassifier(n_estimators=5, random_state=0).fit(
        enc.matrix(num, cat), np.array(enc.class_names)[y]
    )
    path = tmp_path / "teacher.skops"
    save_skops(model, path)
    # GradientBoosting holds sklearn's Tree type, which skops does not trust until the user says so.
    with pytest.raises(
        ConfigError,
        match=r"teacher\.members\.0\.trusted: teacher\.skops holds types .*"
        r"sklearn\.tree\._tree\.Tree",
    ):
        build_teacher(_teacher([{"kind": "skops", "path": str(path)}]), enc, seed=0)
    section = _teacher([{"kind": "skops", "path": str(path), "trusted": ["sklearn.tree._tree.Tree"]}])
    teacher, trained = build_teacher(section, enc, seed=0)
    assert trained == [False]
    assert np.allclose(teacher.proba(num, cat), model.predict_proba(enc.matrix(num, cat)))


def test_skops_pipeline_on_raw_columns_with_named_classes(tmp_path):
    pytest.importorskip("skops")
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=300), "c": rng.choice(["a", "b"], 300)})
    frame["y"] = np.where(frame["x"] + (frame["c"] == "a") > 0.5, "yes", "no")
    pipe = make_pipeline(
        make_column_transformer((StandardScaler(), ["x"]), (OneHotEncoder(), ["c"])), LogisticRegression()
    ).fit(frame[["x", "c"]], frame["y"])
    path = tmp_path / "pipe.skops"
    save_skops(pipe, path)
    y, names, _ = encode_target(frame, "y")
    enc = TabularEncoder.fit(frame, "y", names, ["x"], ["c"], encoding="ordinal")
    num, cat = enc.codes(frame)
    teacher, _ = build_teacher(_teacher([{"kind": "skops", "path": str(path), "input": "raw"}]), enc, seed=0)
    assert np.allclose(teacher.proba(num, cat), pipe.predict_proba(frame[["x", "c"]]))
    # A model of another target is refused, naming both class lists
    other = TabularEncoder.fit(frame, "y", ["0", "1"], ["x"], ["c"])
    with pytest.raises(CompatibilityError, match=r"classes \['no', 'yes'\] do not match"):
        build_teacher(_teacher([{"kind": "skops", "path": str(path), "input": "raw"}]), other, seed=0)


def test_without_skops_loading_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skops", None)
    monkeypatch.setitem(sys.modules, "skops.io", None)
    with pytest.raises(ConfigError, match="pip install skops"):
        load_skops(tmp_path / "model.skops")
