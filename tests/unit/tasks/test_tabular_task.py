"""The tabular task through the one pipeline: the Task protocol, the run-directory contract, metrics.json in the one
schema, `kdkit eval` (pipeline.evaluate_run) on a finished run, and --resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from kdkit.evaluate.schema import check_metrics, mean_of, per_seed_of
from kdkit.interpret import predict_table
from kdkit.pipeline import distill, evaluate_run
from kdkit.run.run_dir import environment
from kdkit.tasks import TASKS, task_of
from kdkit.tasks.base import Task
from kdkit.tasks.tabular_eval import GAIN_KEYS

WINE = {
    "kind": "interpret",
    "run": {"name": "wine", "seeds": [0, 1], "save_skops": False},
    "data": {"source": "builtin", "name": "wine", "test_fraction": 0.3, "resplit_each_seed": True},
    "teacher": {"members": [{"kind": "random_forest", "params": {"n_estimators": 10}}]},
    "student": {"tree": {"max_depth": 3}},
    "neighbourhood": {"points": 300, "eval_points": 200},
    "eval": {"batch_size": 32, "latency_repeats": 3, "latency_warmup": 1},
}
PHASES = ["baseline-s0", "student-s0", "baseline-s1", "student-s1"]


@pytest.fixture(scope="module")
def wine_run(tmp_path_factory):
    """One two-seed run, shared by the tests that read it: (run directory, the log lines)."""
    lines = []
    result = distill(WINE, out=tmp_path_factory.mktemp("runs") / "wine", log=lines.append)
    return result.run_dir, lines


def test_tabular_implements_the_task_protocol():
    task = TASKS["tabular"]
    assert isinstance(task, Task)
    assert task.name == "tabular" and task.search_metrics == ()
    assert task_of({"kind": "interpret"}) is task and task_of({"data": {"task": "tabular"}}) is task
    cfg = task.load_config({"data": {"task": "tabular", "name": "iris"}}, ("run.seeds=[3, 4]",))
    assert cfg.kind == "interpret" and cfg.data.name == "iris" and cfg.run.seeds == [3, 4]
    # what the pipeline reads of every task's config
    assert (cfg.run.name, cfg.run.out_dir, cfg.run.device, cfg.run.threads, cfg.data.split_seed) == (
        "interpret", "runs", "cpu", None, 0,
    )
    assert task.load_config(yaml.safe_load(task.dump_config(cfg)), ()) == cfg


def test_run_directory_holds_the_shared_contract(wine_run):
    run, lines = wine_run
    for name in ["config.yaml", "env.json", "metrics.json", "history.json", "report.md", "student/student.json",
                 "student/encoder.json", "student/rules.txt", "plots/tree.png", "plots/accuracy.png"]:
        assert (run / name).is_file(), name
    for phase in PHASES:
        assert (run / "phases" / phase / "result.json").is_file(), phase
        assert (run / "phases" / phase / "student.json").is_file(), phase
    # env.json: the keys every task writes (RunDir), not interpret's own
    env = json.loads((run / "env.json").read_text())
    assert set(env) == set(environment("cpu", [0, 1], 0)) and env["seeds"] == [0, 1]
    assert "scikit-learn" in env and "scikit_learn" not in env
    assert set(json.loads((run / "history.json").read_text())) == set(PHASES)
    assert yaml.safe_load((run / "config.yaml").read_text())["student"]["tree"]["max_depth"] == 3
    assert any(line.startswith("student-s1: teacher") for line in lines)


def test_metrics_follow_the_one_schema(wine_run):
    run, _ = wine_run
    m = json.loads((run / "metrics.json").read_text())
    check_metrics(m)
    assert m["task"] == "tabular" and m["seeds"] == [0, 1]
    # the teacher is refit on each seed's split: the per-seed form, like the students
    for model in ("teacher", "baseline_student", "student"):
        assert len(per_seed_of(m[model]["accuracy"])) == 2, model
    for key in ("fidelity_test", "fidelity_neighbourhood", "leaves", "depth", "rules", "f1_macro", "nll"):
        assert key in m["student"] and key in m["baseline_student"], key
    # the gain pairs seeds: the mean of (student − baseline) per seed
    assert set(m["gain"]) == set(GAIN_KEYS)
    for key in GAIN_KEYS:
        diffs = np.subtract(m["student"][key]["per_seed"], m["baseline_student"][key]["per_seed"])
        assert m["gain"][key]["n"] == 2 and m["gain"][key]["mean"] == pytest.approx(diffs.mean())
    # params: the kept tree's nodes; the teacher's: every node of its 10 trees
    spec = json.loads((run / "student" / "student.json").read_text())
    assert spec["seed"] == 0 and m["cost"]["student"]["params"] == len(spec["children_left"])
    assert m["cost"]["teacher"]["params"] > 10 * m["cost"]["student"]["params"]
    assert m["cost"]["student"]["batch_size"] == 32
    # no validation score chose the kept student: the first seed's, and best_seed says so
    by = "first seed (no validation metric)"
    assert m["best_seed"] == {"phase": "student-s0", "seed": 0, "by": by, "value": None}
    assert m["data"]["rows"] == 178 and m["data"]["classes"] == ["class_0", "class_1", "class_2"]
    assert m["teacher_kinds"] == ["random_forest"] and m["student_model"]["kind"] == "decision_tree"
    assert set(m["per_class"]["test"]) == set(m["data"]["classes"])
    # a warning per fidelity whose mean over seeds is below report.low_fidelity (0.9)
    low = [key for key in ("fidelity_test", "fidelity_neighbourhood") if mean_of(m["student"][key]) < 0.9]
    assert len(m["low_fidelity"]) == len(low)
    # the report reads the same schema
    report = (run / "report.md").read_text()
    assert "## Fidelity per class" in report and "| distilled student |" in report


def test_the_kept_student_loads_and_predicts_as_measured(wine_run):
    run, _ = wine_run
    m = json.loads((run / "metrics.json").read_text())
    student = TASKS["tabular"].load_student(run / "student")
    assert student.seed == 0 and student.kind == "decision_tree"
    from sklearn.datasets import load_wine

    from kdkit.interpret.tabular import split_rows

    bunch = load_wine(as_frame=True)
    frame = bunch.frame.assign(target=np.asarray(bunch.target_names)[bunch.target])
    _, test = split_rows(bunch.target.to_numpy(), 0.3, 0)  # seed 0's split: split_seed 0 + seed 0
    rows = frame.iloc[test]
    probs = student.predict_proba(rows)
    assert np.array_equal(probs, predict_table(run, rows))
    accuracy = (probs.argmax(1) == bunch.target.to_numpy()[test]).mean()
    assert accuracy == pytest.approx(m["student"]["accuracy"]["per_seed"][0])


def test_eval_of_a_finished_run_repeats_its_figures(wine_run):
    run, _ = wine_run
    saved = json.loads((run / "metrics.json").read_text())
    again = evaluate_run(run, log=lambda _: None)
    assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(again))
    check_metrics(again)
    # As for every task: the kept student (and its seed's teacher, refit identically) measured again.
    kept = saved["seeds"].index(saved["best_seed"]["seed"])
    assert again["seeds"] == [saved["best_seed"]["seed"]]
    for model in ("teacher", "student"):
        for key, value in saved[model].items():
            if key != "seconds":  # the teacher's fitting time is measured again
                assert again[model][key] == per_seed_of(value)[kept], (model, key)
    assert set(again["cost"]) == {"teacher", "student"} and "gain" not in again


def test_resume_reuses_every_phase_and_writes_the_same_metrics(wine_run):
    run, _ = wine_run
    saved = json.loads((run / "metrics.json").read_text())
    lines = []
    result = distill(WINE, out=run, resume=True, log=lines.append)
    assert sum("finished earlier, reusing" in line for line in lines) == len(PHASES)
    for model in ("baseline_student", "student"):
        assert result.metrics[model] == saved[model]
    # the students were read back from JSON: the tree drawn when it was fit stays in the report
    assert (run / "plots" / "tree.png").is_file() and "plots/tree.png" in (run / "report.md").read_text()


def test_a_config_without_kind_that_names_the_task_runs(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=120), "c": rng.choice(["a", "b"], 120)})
    frame["y"] = np.where(frame["x"] + (frame["c"] == "a") > 0.5, "yes", "no")
    frame.to_csv(tmp_path / "t.csv", index=False)
    config = {
        "run": {"name": "t", "save_skops": False},
        "data": {"task": "tabular", "source": "csv", "path": str(tmp_path / "t.csv"), "target": "y"},
        "teacher": {"members": [{"kind": "gradient_boosting", "params": {"n_estimators": 10}}]},
        "student": {"kind": "logistic_l1"},
        "neighbourhood": {"points": 100, "eval_points": 100},
        "eval": {"latency_repeats": 2, "latency_warmup": 0, "batch_size": 8},
    }
    result = distill(config, out=tmp_path / "run", log=lambda _: None)
    check_metrics(result.metrics)
    assert result.metrics["task"] == "tabular" and result.metrics["student"]["nonzero"] >= 1
    assert "## yes" in (result.run_dir / "student" / "rules.txt").read_text()
