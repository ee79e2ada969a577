"""kdkit sweep: the grid, the frontier and the tolerance by hand; a tiny sweep end to end (teacher once, a run per
point, resume, a point's folder evaluated as any run); one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest

from kdkit.errors import ConfigError
from kdkit.evaluate.frontier import frontier, summarize, within
from kdkit.pipeline import evaluate_run
from kdkit.report.sweep import smallest_line, sweep_markdown
from kdkit.sweep import folder_name, grid_points, sweep

TINY = {
    "run": {"name": "sw", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}], "train": {"epochs": 2}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 1},
    "eval": {"robustness": False, "latency_repeats": 2, "latency_warmup": 0},
    "sweep": {"grid": {"student.model.kwargs.hidden": [[4], [16, 16]]}, "tolerance": 0.5},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))


def test_grid_points_are_every_combination_last_path_fastest():
    points = grid_points({"student.model.kwargs.hidden": [[8], [8, 8]], "train.lr": [0.1, 0.01]})
    assert [name for name, _ in points] == [
        "hidden=[8] lr=0.1", "hidden=[8] lr=0.01", "hidden=[8, 8] lr=0.1", "hidden=[8, 8] lr=0.01"
    ]
    assert points[2][1] == ["student.model.kwargs.hidden=[8, 8]", "train.lr=0.1"]
    assert folder_name(2, "hidden=[8, 8] lr=0.1") == "02_hidden=_8_8_lr=0_1"
    # Explicit points follow the grid: for families a grid cannot express (another model with its own kwargs).
    more = grid_points({"student.model.kwargs.hidden": [[8]]},
                       [{"student.model.name": "small_cnn", "student.model.kwargs": {"width": 4}}])
    assert more == [("hidden=[8]", ["student.model.kwargs.hidden=[8]"]),
                    ("name=small_cnn kwargs={width: 4}",
                     ['student.model.name="small_cnn"', 'student.model.kwargs={"width": 4}'])]


def row(name, params, latency, student, baseline=None):
    return {"name": name, "params": params, "latency_ms": latency, "student": student, "baseline": baseline,
            "teacher": 0.96, "student_std": 0.0, "baseline_std": 0.0, "gain": None, "gain_ci95": None}


def test_frontier_and_smallest_within_tolerance_by_hand():
    rows = [row("A", 10, 1.0, 0.90, 0.91), row("B", 20, 2.0, 0.95, 0.90), row("C", 30, 1.5, 0.93, 0.92),
            row("D", 40, 4.0, 0.95, 0.89)]
    # By parameters: C is beaten by B (fewer, better); D ties B's quality at more cost.
    assert frontier(rows, "student", "params", "accuracy") == ["A", "B"]
    # By latency: C (1.5 ms) sits between A and B and beats A, so it is on the frontier.
    assert frontier(rows, "student", "latency_ms", "accuracy") == ["A", "B", "C"]
    assert frontier(rows, "baseline", "params", "accuracy") == ["A", "C"]
    # Perplexity: lower is better.
    ppl = [row("s", 1, 1.0, 30.0), row("m", 2, 2.0, 25.0), row("l", 3, 3.0, 26.0)]
    assert frontier(ppl, "student", "params", "perplexity") == ["s", "m"]
    assert within(0.951, 0.96, 0.01, "accuracy") and not within(0.949, 0.96, 0.01, "accuracy")
    assert within(22.0, 20.0, 0.1, "perplexity") and not within(22.1, 20.0, 0.1, "perplexity")
    summary = summarize(rows, "accuracy", 0.01, 0.96)
    assert summary["smallest_within_tolerance"] == "B"  # B and D are within a point; B has fewer parameters
    assert "B, 95.00%, 20 parameters" in smallest_line(summary)
    none = summarize(rows, "accuracy", 0.001, 0.96)
    assert none["smallest_within_tolerance"] is None
    assert "no distilled student within 0.1 points" in smallest_line(none) and "the best is B" in smallest_line(none)
    assert "| B ★ | 20 |" in sweep_markdown(summary)


def test_a_tiny_sweep_end_to_end_and_resumed(tmp_path):
    out = tmp_path / "sweep"
    logs: list[str] = []
    summary = sweep(copy.deepcopy(TINY), out=out, log=logs.append)
    assert [r["name"] for r in summary["rows"]] == ["hidden=[4]", "hidden=[16, 16]"]
    small, big = summary["rows"]
    assert small["params"] < big["params"]  # 64·4 + 4 + 4·10 + 10 = 310 < 64·16 + 16 + 16·16 + 16 + 16·10 + 10
    assert small["params"] == 64 * 4 + 4 + 4 * 10 + 10
    assert all(r["student"] is not None and r["baseline"] is not None for r in summary["rows"])
    assert (out / "teachers").is_dir()
    for r in summary["rows"]:
        folder = out / "points" / r["folder"].rsplit("/", 1)[-1]
        assert (folder / "metrics.json").is_file() and (folder / "report.md").is_file()
        assert (folder / "teachers").is_symlink() and not (folder / "phases" / "teacher-0").exists()
    assert sum("teacher-0" in line and "epoch" in line.lower() for line in logs) <= 2  # trained once, not per point
    for name in ("frontier_latency_ms.png", "frontier_params.png"):
        assert (out / "plots" / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "sweep.json").read_text())["rows"] == summary["rows"]
    assert "hidden=[4]" in (out / "sweep.md").read_text()
    # A point is a run like any other: kdkit eval takes its folder (teacher through the link).
    point = out / "points" / folder_name(0, "hidden=[4]")
    again = evaluate_run(point, log=lambda m: None)
    assert again["student"]["accuracy"] == pytest.approx(small["student"])
    logs.clear()
    resumed = sweep(copy.deepcopy(TINY), out=out, resume=True, log=logs.append)
    assert sum("(finished: reused)" in line for line in logs) == 2
    assert resumed["rows"] == summary["rows"]
    # A point added to the config later: the finished ones are reused, only the new one trains.
    grown = copy.deepcopy(TINY)
    grown["sweep"]["points"] = [{"student.model.kwargs.hidden": [8, 4]}]
    logs.clear()
    third = sweep(grown, out=out, resume=True, log=logs.append)
    assert sum("(finished: reused)" in line for line in logs) == 2 and len(third["rows"]) == 3
    assert third["rows"][:2] == summary["rows"]


def test_bad_sweeps_are_refused_in_one_line(tmp_path):
    def with_grid(grid):
        return {**TINY, "sweep": {"grid": grid}}

    with pytest.raises(ConfigError, match=r"sweep.grid.teacher.train.epochs: the teacher, the data and the run stay"):
        sweep(with_grid({"teacher.train.epochs": [1, 2]}), out=tmp_path / "a", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"sweep point 'lr=-1': config: train.lr: got -1; input should be greater"):
        sweep(with_grid({"train.lr": [0.1, -1]}), out=tmp_path / "b", log=lambda m: None)
    assert not (tmp_path / "b").exists()  # every point is checked before anything is trained
    twice = {**TINY, "sweep": {"grid": {"train.lr": [0.1]}, "points": [{"train.lr": 0.1}]}}
    with pytest.raises(ConfigError, match=r"sweep: the point 'lr=0.1' comes twice"):
        sweep(twice, out=tmp_path / "e", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"sweep.points.0.data.limit: the teacher, the data and the run stay"):
        sweep({**TINY, "sweep": {"points": [{"data.limit": 100}]}}, out=tmp_path / "f", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"sweep.grid: empty"):
        sweep({**TINY, "sweep": {}}, out=tmp_path / "c", log=lambda m: None)
    with pytest.raises(ConfigError, match=r"sweep.grid: student.model.kwargs.hidden: no values; expected a list"):
        sweep(with_grid({"student.model.kwargs.hidden": []}), out=tmp_path / "d", log=lambda m: None)
