"""The one flow's contract: every entry of TASKS implements the Task protocol and produces the same run directory;
`kdkit eval`, `search` and `export` run on a tiny config of every task, or refuse in one line that says why; the
kept student is the best seed in keep_best's own direction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdkit.errors import ConfigError
from kdkit.evaluate.schema import check_metrics
from kdkit.pipeline import distill, evaluate_run
from kdkit.run import Phase, PhaseResult, best_seed
from kdkit.tasks import TASKS
from kdkit.tasks.base import Task

PROTOCOL = ("load_config", "dump_config", "check", "load_data", "build_teacher", "recipe", "evaluate",
            "save_student", "load_student", "report")
ENV_KEYS = {"kdkit", "python", "torch", "numpy", "scikit-learn", "device", "threads", "seeds", "processes",
            "split_seed"}


def classification_config(tmp_path: Path) -> dict:
    return {
        "run": {"name": "tiny", "seeds": [0, 1], "progress": False, "tensorboard": False},
        "data": {"source": "builtin", "name": "digits", "limit": 300},
        "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}],
                    "train": {"epochs": 2, "batch_size": 32}},
        "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
        "distill": {"cache_dir": str(tmp_path / "cache")},
        "train": {"epochs": 2, "batch_size": 32},
        "eval": {"latency_repeats": 2, "latency_warmup": 0},
        "search": {"space": {"train.lr": {"low": 0.001, "high": 0.01, "log": True}}, "trials": 2, "seeds": [0]},
    }


def lm_config(tmp_path: Path, corpus: Path, teacher: Path) -> dict:
    return {
        "run": {"name": "lm", "seeds": [0, 1], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "max_length": 24,
                 "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3]}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, {"name": "token_kl", "weight": 0.5}]},
        "llm": {"report_samples": 1, "prompt_tokens": 6, "generation": {"max_new_tokens": 4}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003},
        "eval": {"batch_size": 8, "latency_repeats": 2, "latency_warmup": 0},
        "search": {"space": {"train.lr": {"low": 0.001, "high": 0.01, "log": True}}, "trials": 1, "seeds": [0],
                   "metric": "loss"},
    }


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_implements_the_protocol(name):
    task = TASKS[name]
    assert isinstance(task, Task)
    assert task.name == name
    for method in PROTOCOL:
        assert callable(getattr(task, method, None)), f"{name}.{method}"
    assert isinstance(task.columns, list) and task.columns, name
    assert isinstance(task.search_metrics, tuple)
    assert task.shipping is None or (isinstance(task.shipping, str) and "\n" not in task.shipping)


def tabular_config() -> dict:
    return {
        "kind": "interpret",
        "run": {"name": "wine", "seeds": [0, 1], "save_skops": False},
        "data": {"source": "builtin", "name": "wine", "test_fraction": 0.3},
        "teacher": {"members": [{"kind": "random_forest", "params": {"n_estimators": 10}}]},
        "student": {"tree": {"max_depth": 3}},
        "neighbourhood": {"points": 300, "eval_points": 200},
        "eval": {"batch_size": 32, "latency_repeats": 3, "latency_warmup": 1},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lm_world):
    """A finished tiny run of every task: {name: (config, RunResult)}."""
    root = tmp_path_factory.mktemp("runs")
    corpus, teacher, _ = lm_world
    configs = {"classification": classification_config(root), "causal_lm": lm_config(root, corpus, teacher),
               "tabular": tabular_config()}
    assert set(configs) == set(TASKS), "a new task needs a tiny config here"
    return {name: (configs[name], distill(cfg, out=root / name, log=lambda m: None)) for name, cfg in configs.items()}


KEY = {"classification": "accuracy", "causal_lm": "perplexity", "tabular": "accuracy"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_writes_the_same_run_directory(runs, name):
    cfg, result = runs[name]
    run = result.run_dir
    for path in ("config.yaml", "env.json", "metrics.json", "history.json", "report.md", "student"):
        assert (run / path).exists(), f"{name}: {path}"
    assert ENV_KEYS <= set(json.loads((run / "env.json").read_text()))
    metrics = json.loads((run / "metrics.json").read_text())
    check_metrics(metrics)
    assert metrics["task"] == name and metrics["seeds"] == [0, 1]
    assert {"baseline-s0", "student-s0", "baseline-s1", "student-s1"} <= set(json.loads((run / "history.json")
                                                                                    .read_text()))
    for phase in ("baseline-s0", "student-s1"):
        assert (run / "phases" / phase / "result.json").is_file()
    assert metrics["best_seed"]["phase"] in ("student-s0", "student-s1")
    assert (run / "student").is_dir() and any((run / "student").iterdir())
    for key in ("latency_ms", "throughput", "speedup_latency", "speedup_throughput", "params", "size_mb"):
        assert key in metrics["cost"]["student"] and key in metrics["cost"]["teacher"]
    assert metrics["cost"]["teacher"]["speedup_latency"] == 1.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_recomputes_the_kept_students_figures(runs, name):
    _, result = runs[name]
    again = evaluate_run(result.run_dir, log=lambda m: None)
    check_metrics(again)
    best = result.metrics["best_seed"]["seed"]
    key = KEY[name]
    kept = result.metrics["student"][key]["per_seed"][result.metrics["seeds"].index(best)]
    assert again["student"][key] == pytest.approx(kept, rel=1e-5)
    teacher = result.metrics["teacher"][key]  # the tabular teacher is refit per seed: the kept seed's
    teacher = teacher["per_seed"][result.metrics["seeds"].index(best)] if isinstance(teacher, dict) else teacher
    assert again["teacher"][key] == pytest.approx(teacher, rel=1e-5)
    assert (result.run_dir / "eval.json").is_file()


@pytest.mark.parametrize("name", ["classification", "causal_lm"])
def test_search_runs_on_every_task_with_validation_metrics(runs, name, tmp_path):
    from kdkit.search import search

    cfg, _ = runs[name]
    summary = search(cfg, out=tmp_path / "search", trials=1, log=lambda m: None)
    assert summary["complete"] == 1 and (tmp_path / "search" / "best_config.yaml").is_file()


def test_search_refuses_a_task_without_validation_metrics_in_one_line(runs, tmp_path):
    from kdkit.search import search

    cfg, _ = runs["tabular"]
    with pytest.raises(ConfigError) as err:
        search(cfg, out=tmp_path / "search", trials=1, log=lambda m: None)
    assert "tabular" in str(err.value) and "no validation metric" in str(err.value) and "\n" not in str(err.value)


def test_export_takes_classifiers_and_refuses_other_tasks_in_one_line(runs, tmp_path):
    from kdkit.export import export_run

    _, result = runs["classification"]
    exported = export_run(result.run_dir, "safetensors", tmp_path / "export", log=lambda m: None)
    assert exported.max_abs_diff < 1e-5
    _, lm = runs["causal_lm"]
    with pytest.raises(ConfigError) as err:
        export_run(lm.run_dir, "onnx", tmp_path / "lm_export", log=lambda m: None)
    assert "causal_lm" in str(err.value) and "HF folder" in str(err.value) and "\n" not in str(err.value)
    _, tab = runs["tabular"]
    with pytest.raises(ConfigError) as err:
        export_run(tab.run_dir, "onnx", tmp_path / "tab_export", log=lambda m: None)
    assert "tabular" in str(err.value) and "student.json" in str(err.value) and "\n" not in str(err.value)


def test_eval_refuses_an_unfinished_run_in_one_line(runs, tmp_path):
    _, result = runs["classification"]
    broken = tmp_path / "broken"
    shutil.copytree(result.run_dir, broken)
    (broken / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="did the run finish"):
        evaluate_run(broken, log=lambda m: None)


def fake(seed: int, values: list[float], metric: str) -> PhaseResult:
    history = [{"epoch": float(i + 1), f"val/{metric}": v} for i, v in enumerate(values)]
    return PhaseResult(Phase("student", seed), model=seed, summary={"history": history})


def test_best_seed_follows_the_direction_of_keep_best():
    """The bug: the classifier flow kept max(val_score) whatever keep_best said (the worst seed by loss), the LM
    flow min(val_score) (the least accurate seed by accuracy)."""
    by_loss = [fake(0, [0.9, 0.5], "loss"), fake(1, [0.8, 0.3], "loss"), fake(2, [1.2, 0.7], "loss")]
    best, chosen = best_seed(by_loss, ("loss", "min", "best"))
    assert best.phase.seed == 1 and chosen == {"phase": "student-s1", "seed": 1, "by": "val/loss", "value": 0.3}
    by_accuracy = [fake(0, [0.6, 0.7], "accuracy"), fake(1, [0.9, 0.8], "accuracy"), fake(2, [0.5, 0.4], "accuracy")]
    assert best_seed(by_accuracy, ("accuracy", "max", "best"))[0].phase.seed == 1
    assert best_seed(by_accuracy, ("accuracy", "max", "last"))[0].phase.seed == 1
    assert best_seed(by_loss, ("loss", "min", "last"))[0].phase.seed == 1
    assert best_seed(by_loss, None)[0].phase.seed == 0  # no validation: the first seed


@pytest.mark.parametrize("name", ["classification", "causal_lm"])
@pytest.mark.parametrize("keep_best", ["loss", "accuracy"])
def test_the_saved_student_is_the_best_seed_in_every_task(runs, name, keep_best, tmp_path):
    """Through the real pipeline: RUN_DIR/student is the seed best by keep_best in its direction."""
    cfg, _ = runs[name]
    cfg = {**cfg, "train": {**cfg["train"], "keep_best": keep_best}}
    result = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    values = {s: [h[f"val/{keep_best}"] for h in history[f"student-s{s}"] if f"val/{keep_best}" in h] for s in (0, 1)}
    pick = min if keep_best == "loss" else max
    expected = pick((0, 1), key=lambda s: pick(values[s]))
    assert result.metrics["best_seed"]["seed"] == expected
    assert result.metrics["best_seed"]["by"] == f"val/{keep_best}"


@pytest.mark.parametrize("name", ["classification", "causal_lm"])
def test_teacher_and_students_are_timed_the_same_way(runs, name, monkeypatch, tmp_path):
    """One definition of cost: every model behind the same frozen wrapper, with the same repeats and warm-up
    (the bug: classifiers timed 10 + 50 batch-1 calls, LMs 1 + ≥5; the teacher through its wrapper, the student
    bare)."""
    from kdkit.teachers import Teacher, TeacherEnsemble

    module = __import__(f"kdkit.tasks.{name}_eval", fromlist=["measure_cost"])
    calls = []
    real = module.measure_cost

    def spy(forward, modules, one, batch, **kw):
        calls.append((forward, kw["repeats"], kw["warmup"], tuple(one.shape), tuple(batch.shape)))
        return real(forward, modules, one, batch, **kw)

    monkeypatch.setattr(module, "measure_cost", spy)
    cfg, _ = runs[name]
    cfg = {**cfg, "run": {**cfg["run"], "seeds": [0]}, "eval": {**cfg["eval"], "latency_repeats": 3,
                                                              "latency_warmup": 1}}
    result = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    assert len(calls) == 3  # teacher, baseline, student
    teacher, *students = calls
    assert isinstance(teacher[0], TeacherEnsemble)
    for forward, repeats, warmup, one, batch in students:
        assert isinstance(forward, Teacher)  # the same frozen wrapper as the teacher's members
        assert forward.precision == teacher[0].members[0].precision
        assert (repeats, warmup, one, batch) == teacher[1:]
        assert (repeats, warmup) == (3, 1)
    cost = result.metrics["cost"]
    for key in ("baseline_student", "student"):
        assert cost[key]["speedup_latency"] == pytest.approx(cost["teacher"]["latency_ms"] / cost[key]["latency_ms"])
        assert cost[key]["speedup_throughput"] == pytest.approx(cost[key]["throughput"] / cost["teacher"]["throughput"])
