"""student.auto (kdkit.interpret.auto): the tabular student's setting chosen per seed by cross-validation within the
training split, labels alone among the candidates; its record in metrics.json and the report; `kdkit train --auto`
on a tabular config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from kdkit.errors import ConfigError, DataError
from kdkit.interpret.auto import (
    LABELS_ALONE,
    Setting,
    candidates,
    choose,
    chosen_setting,
    fit_setting,
    pick,
    summarise,
    value_of,
)
from kdkit.interpret.config import load_interpret_config
from kdkit.interpret.tabular import TabularEncoder

CLASSES = ["neg", "pos"]


def _cfg(**auto):
    base = {
        "kind": "interpret",
        "student": {"tree": {"max_depth": 4, "min_samples_leaf": 3, "targets": "soft"}, "auto": {"enabled": True}},
        "neighbourhood": {"points": 3000, "scale": 0.3},
    }
    base["student"]["auto"].update(auto)
    return load_interpret_config(base)


def _table(n: int, noise: float, seed: int = 0):
    """Two numeric features, class 1 when x0 + x1 > 0 (a diagonal: a tree needs many splits), a share `noise` of
    the labels flipped. Returns (encoder, num, cat, noisy y)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = (x.sum(axis=1) > 0).astype(np.int64)
    flip = rng.random(n) < noise
    y[flip] = 1 - y[flip]
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "target": np.array(CLASSES)[y]})
    encoder = TabularEncoder.fit(frame, "target", CLASSES, ["a", "b"], [])
    num, cat = encoder.codes(frame)
    return encoder, num, cat, y


class _Teacher:
    """A stand-in teacher: probabilities from a function of the numbers; records the rows it was fit on."""

    def __init__(self, proba):
        self._proba = proba

    def proba(self, num, cat):
        return self._proba(num)


def _oracle(num):
    p = 1 / (1 + np.exp(-6 * num.sum(axis=1)))
    return np.stack([1 - p, p], axis=1)


def _fitter(proba, calls: list | None = None):
    def fit(num, cat, y):
        if calls is not None:
            calls.append(num.copy())
        return _Teacher(proba)

    return fit


def test_candidates_put_labels_first_then_the_simpler_and_include_the_configured_setting():
    cfg = _cfg(points=[500, 0, 500], targets=["soft", "hard"])
    assert [c.name for c in candidates(cfg)] == ["labels", "hard@0", "soft@0", "hard@500", "soft@500", "soft@3000"]
    cfg = _cfg(points=[3000], targets=["soft"])  # the configured pair is in the grid: listed once
    assert [c.name for c in candidates(cfg)] == ["labels", "soft@3000"]
    assert pick([0.9, 0.9, 0.8]) == 0 and pick([0.9, 0.95, 0.95]) == 1


def test_labels_alone_figure_is_plain_cross_validation_of_the_label_tree():
    """The pooled held-out accuracy of `labels` equals scikit-learn's cross_val_predict of the same tree."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    encoder, num, cat, y = _table(120, 0.2)
    cfg = _cfg(points=[0], targets=["hard"], folds=4)
    record = choose(cfg, encoder, num, cat, y, 7, _fitter(_oracle), CLASSES)
    tree = DecisionTreeClassifier(max_depth=4, min_samples_leaf=3, random_state=7)
    pred = cross_val_predict(tree, encoder.matrix(num, cat), y, cv=StratifiedKFold(4, shuffle=True, random_state=7))
    assert value_of(record, "labels") == pytest.approx((pred == y).mean(), abs=1e-12)
    assert record["folds"] == 4 and record["metric"] == "accuracy" and record["given"] == "soft@3000"


def test_the_teacher_is_fit_again_per_fold_without_its_validation_rows():
    encoder, num, cat, y = _table(90, 0.1)
    calls: list = []
    choose(_cfg(points=[0], targets=["hard"], folds=3), encoder, num, cat, y, 0, _fitter(_oracle, calls), CLASSES)
    assert len(calls) == 3
    rows = [{tuple(r) for r in fold} for fold in calls]
    every = {tuple(r) for r in num}
    held_out = [every - fold for fold in rows]
    assert all(len(h) == 30 for h in held_out)  # each fold's teacher misses its 30 validation rows
    assert set().union(*held_out) == every  # and every row is held out once


def test_a_useless_teacher_leaves_labels_alone():
    encoder, num, cat, y = _table(150, 0.0)
    constant = _fitter(lambda n: np.tile([1.0, 0.0], (len(n), 1)))
    rng = np.random.default_rng(0)
    noise = _fitter(lambda n: (lambda p: np.stack([1 - p, p], axis=1))(rng.random(len(n))))
    for teacher in (constant, noise):
        for metric in ("accuracy", "f1_macro"):
            record = choose(_cfg(points=[0, 300], metric=metric), encoder, num, cat, y, 1, teacher, CLASSES)
            assert record["chosen"] == "labels", (metric, record["candidates"])
            assert chosen_setting(record) == LABELS_ALONE
    # A logistic student cannot be fit to one class: those candidates are left out (None), never chosen
    logistic = _cfg(points=[0, 300], targets=["hard"])
    logistic = logistic.model_copy(update={"student": logistic.student.model_copy(update={"kind": "logistic_l1"})})
    record = choose(logistic, encoder, num, cat, y, 1, constant, CLASSES)
    assert record["chosen"] == "labels"
    assert [c["value"] is None for c in record["candidates"]] == [False, True, True, True]
    summary = summarise([record], [1])
    assert np.isnan(summary["candidates"][1]["validation"]["mean"])


def test_the_configured_setting_wins_where_distillation_clearly_helps():
    """Few noisy labels, a teacher that knows the boundary: many synthetic points it labels beat the labels."""
    encoder, num, cat, y = _table(80, 0.1)
    record = choose(_cfg(points=[0], targets=["hard"]), encoder, num, cat, y, 0, _fitter(_oracle), CLASSES)
    assert record["chosen"] == record["given"] == "soft@3000"
    assert chosen_setting(record) == Setting(3000, "soft")
    assert value_of(record, "soft@3000") > value_of(record, "labels") + 0.05


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro"])
def test_the_choice_is_never_worse_than_labels_alone_on_validation(metric):
    for seed, noise in ((0, 0.0), (1, 0.15), (2, 0.3)):
        encoder, num, cat, y = _table(100, noise, seed)
        record = choose(_cfg(points=[0, 200], metric=metric), encoder, num, cat, y, seed, _fitter(_oracle), CLASSES)
        chosen, labels = value_of(record, record["chosen"]), value_of(record, "labels")
        assert chosen >= labels and chosen == max(c["value"] for c in record["candidates"])


def test_fit_setting_labels_alone_is_the_baseline_fit():
    encoder, num, cat, y = _table(80, 0.1)
    cfg = _cfg()
    a = fit_setting(cfg.student, LABELS_ALONE, 2, 3, encoder, None, num, cat, y, cfg.neighbourhood)
    from kdkit.interpret.students import build_student

    b = build_student(cfg.student, 2, 3).fit_labels(encoder.matrix(num, cat), y)
    assert a.to_json() == b.to_json() and a.targets == "soft"  # labels alone ignores the targets
    hard = fit_setting(cfg.student, Setting(100, "hard"), 2, 3, encoder, _Teacher(_oracle), num, cat, y,
                       cfg.neighbourhood)
    assert hard.targets == "hard" and hard.to_json()["samples"][0] == 80 + 100


def test_summary_gathers_candidates_and_choices_over_seeds():
    def record(chosen, values):
        names = ["labels", "hard@0", "soft@3000"]
        rows = [{"name": n, "points": p, "targets": t, "value": v}
                for n, (p, t), v in zip(names, [(None, None), (0, "hard"), (3000, "soft")], values)]
        return {"metric": "accuracy", "direction": "maximize", "folds": 3, "candidates": rows, "chosen": chosen,
                "given": "soft@3000"}

    summary = summarise([record("soft@3000", [0.9, 0.9, 0.95]), record("labels", [0.92, 0.9, 0.92])], [4, 5])
    rows = {c["name"]: c for c in summary["candidates"]}
    assert rows["labels"]["validation"]["mean"] == pytest.approx(0.91)
    assert rows["soft@3000"]["chosen_by"] == [4] and rows["labels"]["chosen_by"] == [5] and rows["soft@3000"]["given"]
    assert summary["distils"] == 1 and summary["per_seed"][0] == {
        "seed": 4, "chosen": "soft@3000", "value": 0.95, "labels_only": 0.9
    }


@pytest.mark.parametrize(
    "override, field",
    [
        ("student.auto.folds=1", "student.auto.folds"),
        ("student.auto.points=[-5]", "student.auto.points.0"),
        ("student.auto.points=[]", "student.auto.points"),
        ("student.auto.targets=[medium]", "student.auto.targets.0"),
        ("student.auto.metric=nll", "student.auto.metric"),
        ("student.auto.trials=4", "student.auto.trials"),
    ],
)
def test_bad_options_give_one_line_errors(override, field):
    with pytest.raises(ConfigError) as caught:
        load_interpret_config({"kind": "interpret"}, (override,))
    lines = caught.value.lines()
    assert len(lines) == 1 and f"{field}:" in lines[0], lines


def test_more_folds_than_rows_of_a_class_is_a_one_line_error():
    encoder, num, cat, y = _table(40, 0.0)
    y = y.copy()
    y[:] = 0
    y[:3] = 1  # three rows of class pos
    with pytest.raises(DataError) as caught:
        choose(_cfg(folds=5), encoder, num, cat, y, 0, _fitter(_oracle), CLASSES)
    message = str(caught.value)
    assert "\n" not in message and "student.auto.folds: 5" in message and "'pos' has 3 rows" in message


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def _run_config(tmp_path, **student_auto):
    cfg = {
        "kind": "interpret",
        "run": {"name": "auto", "seeds": [0, 1], "save_skops": False},
        "data": {"source": "builtin", "name": "breast_cancer", "limit": 200, "resplit_each_seed": True},
        "teacher": {"members": [{"kind": "gradient_boosting", "params": {"n_estimators": 15, "max_depth": 2}}]},
        "student": {"tree": {"max_depth": 3}, "auto": {"points": [0, 300], "targets": ["hard"], **student_auto}},
        "neighbourhood": {"points": 400, "eval_points": 200},
        "eval": {"latency_repeats": 2, "latency_warmup": 0},
    }
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_with_auto_records_the_choice_and_resumes_identically(tmp_path, capsys):
    from kdkit.cli import main
    from kdkit.evaluate.schema import check_metrics
    from kdkit.pipeline import distill, evaluate_run

    config = _run_config(tmp_path)
    main(["train", str(config), "--auto", "--out", str(tmp_path / "a")])  # --auto reaches student.auto.enabled
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    check_metrics(metrics)
    record = metrics["student_auto"]
    assert [c["name"] for c in record["candidates"]] == ["labels", "hard@0", "hard@300", "soft@400"]
    assert record["search"] == "grid" and record["seeds"] == 2 and record["given"] == "soft@400"
    for seed_record in record["per_seed"]:
        assert seed_record["value"] >= seed_record["labels_only"]
    assert sorted(s for c in record["candidates"] for s in c["chosen_by"]) == [0, 1]
    student, baseline = metrics["student"]["accuracy"]["per_seed"], metrics["baseline_student"]["accuracy"]["per_seed"]
    for i, seed_record in enumerate(record["per_seed"]):  # labels alone chosen: the student is the baseline's tree
        if seed_record["chosen"] == "labels":
            assert student[i] == baseline[i]
    saved = json.loads((tmp_path / "a" / "phases" / "student-s0" / "result.json").read_text())
    assert saved["auto"]["chosen"] == record["per_seed"][0]["chosen"]
    assert "auto: chose" in out and "student-s0: auto chose" in out
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Automatic distillation setting (student.auto)" in report and "labels alone" in report

    again = distill(config, out=tmp_path / "a", overrides=("student.auto.enabled=true",), resume=True,
                    log=lambda _: None)
    assert again.metrics["student_auto"] == record  # resumed: the phases' choices reused
    fresh = distill(config, out=tmp_path / "b", overrides=("student.auto.enabled=true",), log=lambda _: None)
    assert fresh.metrics["student_auto"] == record  # a new run chooses the same: every stream is seeded
    for key in ("accuracy", "fidelity_test", "leaves"):
        assert fresh.metrics["student"][key]["per_seed"] == metrics["student"][key]["per_seed"]
    evaluated = evaluate_run(tmp_path / "a", log=lambda _: None)  # kdkit eval keeps the kept seed's choice
    assert evaluated["student_auto"]["per_seed"] == record["per_seed"][:1]


def test_auto_override_follows_the_task(tmp_path):
    from kdkit.cli import _auto_override

    torch_config = tmp_path / "c.yaml"
    torch_config.write_text("run: {name: x}\n")
    assert _auto_override(_run_config(tmp_path)) == "student.auto.enabled=true"
    assert _auto_override(torch_config) == "distill.auto.enabled=true"


def test_verdict_when_labels_alone_won_gives_the_likely_reason():
    from kdkit.interpret.report import auto_verdict

    metrics = {
        "student_model": {"kind": "decision_tree"},
        "teacher": {"accuracy": 0.9},
        "baseline_student": {"accuracy": 0.897},
        "gain": {"accuracy": {"mean": 0.0, "std": 0.0, "n": 1, "ci95": None}},
        "student_auto": {"metric": "accuracy", "seeds": 1, "distils": 0,
                         "per_seed": [{"seed": 0, "chosen": "labels", "value": 0.9, "labels_only": 0.9}]},
    }
    text = auto_verdict(metrics)
    assert text.startswith("Distillation did not pay on validation: labels alone scored best in every seed")
    assert "not better than the tree on labels alone (90.00% vs 89.70% on test)" in text
    assert "accuracy +0.00 points" in text
    metrics["baseline_student"]["accuracy"] = 0.8
    assert "try more depth or leaves (student.tree)" in auto_verdict(metrics)
