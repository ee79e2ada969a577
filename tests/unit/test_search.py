"""kdkit search: a small search completes, resumes from its SQLite storage, and refuses bad spaces."""

from __future__ import annotations

import json

import optuna
import pytest

from kdkit.errors import ConfigError
from kdkit.search import open_study, sample_overrides, search

TINY = {
    "run": {"name": "s", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}], "train": {"epochs": 2}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}, "baseline": False},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2},
    "eval": {"robustness": False},
    "search": {
        "trials": 3,
        "pruner": "none",
        "space": {
            "distill.losses.1.params.temperature": {"low": 1, "high": 10, "log": True},
            "student.model.kwargs.hidden": {"choices": [[8], [16, 8]]},
        },
    },
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))


def test_search_completes_resumes_and_writes_the_best_config(tmp_path):
    out = tmp_path / "search"
    first = search(TINY, out=out, log=lambda m: None)
    assert first["complete"] == 3 and (out / "best_config.yaml").is_file()
    rows = json.loads((out / "search" / "trials.json").read_text())
    assert len(rows) == 3 and all({"best_mean", "last_mean", "overrides"} <= set(r) for r in rows)
    best = first["best"]
    assert best["best_mean"] == max(r["best_mean"] for r in rows)
    assert (out / "search" / "optimisation_history.png").is_file()
    # A killed search leaves a trial RUNNING; resuming marks it failed and runs only what is missing.
    study = open_study(out / "search.db", "s", "maximize", 0, "none")
    study.ask()
    logs = []
    second = search(TINY, out=out, trials=5, log=logs.append)
    assert any("resuming" in line and "3 trials done, 2 to go" in line for line in logs)
    assert second["complete"] == 5
    states = [t.state for t in open_study(out / "search.db", "s", "maximize", 0, "none").trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    from kdkit.config import load_config

    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.distill.losses[1].params["temperature"] == pytest.approx(
        second["best"]["params"]["distill.losses.1.params.temperature"]
    )


def test_bad_search_spaces_are_refused(tmp_path):
    def with_space(space):
        return {**TINY, "search": {"space": space}}

    with pytest.raises(ConfigError, match=r"low=5 > high=1"):
        search(with_space({"train.lr": {"low": 5, "high": 1}}), out=tmp_path / "a", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"search\.space\.train\.lrr: .*unknown key \(did you mean: lr"):
        search(with_space({"train.lrr": {"low": 0.001, "high": 0.01}}), out=tmp_path / "b", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"teacher, the data and the run layout stay fixed"):
        search(with_space({"teacher.train.lr": {"low": 0.001, "high": 0.01}}), out=tmp_path / "c", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"search\.space: empty"):
        search({**TINY, "search": {}}, out=tmp_path / "d", log=lambda m: None)


def test_sampling_respects_types_and_choices():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = {
        "a": {"low": 1, "high": 4, "integer": True},
        "b": {"choices": [[1, 2], "x"]},
        "c": {"low": 0.1, "high": 1.0, "log": True},
    }
    for _ in range(10):
        overrides = dict(o.split("=", 1) for o in sample_overrides(study.ask(), space))
        assert 1 <= int(overrides["a"]) <= 4
        assert json.loads(overrides["b"]) in ([1, 2], "x")
        assert 0.1 <= float(overrides["c"]) <= 1.0
