"""Students, their saved form, their rules, fidelity, and distillation of a real teacher on breast cancer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import train_test_split

from kdkit.interpret.config import STUDENT_KINDS, TEACHER_KINDS
from kdkit.interpret.fidelity import fidelity, mean_std, quality
from kdkit.interpret.students import STUDENTS, LogisticStudent, TreeStudent, predict_json, tree_rules
from kdkit.interpret.teachers import TEACHERS


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


def test_quality_and_mean_std():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    q = quality(probs, np.array([0, 1, 1, 1]))
    assert q["accuracy"] == pytest.approx(0.75)
    assert q["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7])))
    s = mean_std([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}])
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
