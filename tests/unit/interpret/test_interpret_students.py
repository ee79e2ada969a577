"""Students, their saved form, their rules, fidelity, and distillation of a real teacher on breast cancer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import train_test_split

from kdkit.errors import DataError
from kdkit.evaluate.schema import model_entry
from kdkit.interpret.config import STUDENT_KINDS, TEACHER_KINDS
from kdkit.interpret.fidelity import fidelity, quality
from kdkit.interpret.students import (
    STUDENTS,
    LogisticStudent,
    TreeStudent,
    predict_json,
    student_from_json,
    tree_bytes,
    tree_rules,
)
from kdkit.interpret.teachers import TEACHERS, estimator_footprint


def test_registries_match_the_names_the_config_accepts():
    assert tuple(STUDENTS) == STUDENT_KINDS
    assert set(TEACHERS) == set(TEACHER_KINDS)


def test_fidelity_on_a_stub_with_known_agreement():
    teacher = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    student = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 2])  # 8 of 10 agree: one miss in class 0, one in class 1
    out = fidelity(teacher, student, ["a", "b", "c", "d"])
    assert out["agreement"] == pytest.approx(0.8) and out["n"] == 10
    assert out["per_class"]["a"] == {"n": 4, "agreement": pytest.approx(0.75)}
    assert out["per_class"]["b"] == {"n": 3, "agreement": pytest.approx(2 / 3)}
    assert out["per_class"]["c"] == {"n": 3, "agreement": 1.0}
    assert out["per_class"]["d"]["n"] == 0 and math.isnan(out["per_class"]["d"]["agreement"])
    with pytest.raises(ValueError):
        fidelity(teacher, student[:5], ["a"])


def test_quality_and_the_seed_summary():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    q = quality(probs, np.array([0, 1, 1, 1]))
    assert q["accuracy"] == pytest.approx(0.75)
    assert q["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7])))
    # the seeds are summarised by the one schema's model_entry (interpret's own mean_std is gone)
    s = model_entry([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}])
    assert s == {"a": {"mean": 2.0, "std": 1.0, "per_seed": [1.0, 3.0]}}


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_saved_tree_predicts_like_the_fitted_one(targets):
    x, y = load_iris(return_X_y=True)
    soft = np.eye(3)[y] * 0.8 + 0.2 / 3
    tree = TreeStudent(3, max_depth=3, targets=targets).fit_teacher(x, soft)
    spec = tree.to_json()
    expected = tree.model.predict(x) if targets == "soft" else tree.model.predict_proba(x)
    assert np.allclose(predict_json(spec, x), expected, atol=1e-5)
    # Rules: merging same-class subtrees keeps every point's class; rules cover the rows exactly once
    rules = tree_rules(spec, None, ["setosa", "versicolor", "virginica"], x)
    assert len(rules) <= tree.size()["leaves"] and sum(r["rows"] for r in rules) == len(x)
    assert all(r["conditions"] for r in rules)


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_tree_read_back_from_json_predicts_sizes_and_ranks_like_the_fitted_one(targets):
    x, y = load_iris(return_X_y=True)
    soft = np.eye(3)[y] * 0.8 + 0.2 / 3
    tree = TreeStudent(3, max_depth=3, targets=targets).fit_teacher(x, soft)
    again = student_from_json(json.loads(json.dumps(tree.to_json())))
    assert again.model is None and again.outline(["a", "b", "c", "d"]) is None
    assert np.array_equal(again.predict_proba(x), tree.predict_proba(x))
    assert again.size() == tree.size()
    assert tree.size()["leaves"] == tree.model.get_n_leaves() and tree.size()["depth"] == tree.model.get_depth()
    # importances from the saved impurities equal scikit-learn's feature_importances_
    assert np.allclose(again.importances(), tree.model.feature_importances_, atol=1e-12)
    nodes = tree.model.tree_.node_count
    assert again.footprint() == {"params": nodes, "size_mb": 8 * (4 * nodes + 3 * nodes) / 1e6}
    # the same count for a teacher's tree: nodes, and 8 bytes per child, feature, threshold and value
    assert estimator_footprint(tree.model) == (nodes, tree_bytes(nodes, tree.model.tree_.value.size))


def test_logistic_read_back_from_json_and_its_footprint():
    x, y = load_iris(return_X_y=True)
    student = LogisticStudent(3, C=0.05).fit_labels(x, y)
    again = student_from_json(json.loads(json.dumps(student.to_json())))
    assert np.array_equal(again.predict_proba(x), student.predict_proba(x))
    assert again.size() == student.size() and np.array_equal(again.importances(), student.importances())
    coef = student.model.coef_
    assert again.footprint()["params"] == np.count_nonzero(coef) + 3  # non-zero coefficients + intercepts
    assert again.footprint()["size_mb"] == 8 * (coef.size + 3 + 4 + 4) / 1e6
    with pytest.raises(DataError, match="unknown student kind 'forest'"):
        student_from_json({**student.to_json(), "kind": "forest"})


def test_teacher_footprint_sums_the_trees_of_an_ensemble():
    x, y = load_iris(return_X_y=True)
    model = GradientBoostingClassifier(n_estimators=4, max_depth=2, random_state=0).fit(x, y)
    trees = model.estimators_.ravel()  # 4 stages × 3 classes
    nodes = sum(t.tree_.node_count for t in trees)
    assert len(trees) == 12
    assert estimator_footprint(model) == (nodes, tree_bytes(nodes, nodes))  # one value per regression node


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_saved_logistic_predicts_like_the_fitted_one(n_classes, targets):
    x, y = load_iris(return_X_y=True)
    keep = y < n_classes
    x, y = x[keep], y[keep]
    probs = np.eye(n_classes)[y] * 0.9 + 0.1 / n_classes
    student = LogisticStudent(n_classes, C=0.5, targets=targets).fit_teacher(x, probs)
    fitted = student.model.predict_proba((x - student.mean_) / student.scale_)
    assert np.allclose(predict_json(student.to_json(), x), fitted, atol=1e-8)
    assert student.size()["nonzero"] <= 4


def test_distilled_tree_follows_a_boosting_teacher_on_breast_cancer():
    """Fast settings of the demo: fidelity to the teacher on held-out rows must reach 0.9."""
    from kdkit.interpret.config import TabularDataConfig
    from kdkit.interpret.neighbourhood import sample_codes
    from kdkit.interpret.tabular import TabularEncoder, encode_target, load_frame, select_columns

    data = TabularDataConfig(source="builtin", name="breast_cancer")
    frame = load_frame(data)
    _, numeric, categorical = select_columns(frame, data)
    y, names, _ = encode_target(frame, "target")
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    enc = TabularEncoder.fit(frame.iloc[tr], "target", names, numeric, categorical)
    num, cat = enc.codes(frame.iloc[tr])
    x_tr, x_te = enc.matrix(num, cat), enc.transform(frame.iloc[te])
    teacher = GradientBoostingClassifier(n_estimators=30, random_state=0).fit(x_tr, y[tr])
    s_num, s_cat = sample_codes(enc, num, cat, 1000, seed=0)
    x_fit = np.vstack([x_tr, enc.matrix(s_num, s_cat)])
    student = TreeStudent(2, max_depth=5).fit_teacher(x_fit, teacher.predict_proba(x_fit))
    agreement = fidelity(teacher.predict(x_te), student.predict_proba(x_te).argmax(1), names)["agreement"]
    assert agreement >= 0.9
    assert student.size()["depth"] <= 5
