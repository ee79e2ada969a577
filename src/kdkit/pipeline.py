"""The whole flow, the same for every task, top to bottom:

    config → data → teacher → phases (seeds × baseline / distilled student) → best seed → evaluation → report

(with distill.auto, the distillation setting is chosen on the validation split between teacher and phases)

What differs per task (classification, causal_lm, tabular) comes from the task's object in kdkit.tasks.TASKS;
this file names no task. A run directory holds:
    config.yaml  env.json  metrics.json  history.json  report.md  plots/*.png  tb/
    student/ (the best seed's student)  teachers/  phases/<phase>/  checkpoints/<phase>/
`--resume` reuses finished phases and continues the unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.atomic import write_text
from kdkit.engine.runtime import init_processes, resolve_device
from kdkit.errors import ConfigError
from kdkit.report.auto import auto_section
from kdkit.run import Phase, PhaseResult, RunDir, best_seed, collect_histories, open_run_dir, run_phases
from kdkit.search import auto as search_auto
from kdkit.tasks import load_task

Log = Callable[[str], None]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    student: Any
    teacher: Any


def distill(
    config: str | Path | dict | Any,
    *,
    out: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    log: Log = print,
) -> RunResult:
    """Build (or load) the teacher, train a baseline and a distilled student per seed, evaluate them on the test
    split, keep the best seed's student, write metrics.json and the report."""
    if hasattr(config, "model_dump"):  # an already validated config object: validated again by its task
        config = config.model_dump(mode="json")
    task, cfg = load_task(config, overrides)
    task.check(cfg)  # names, parameters and every value a schedule reaches, before anything is trained
    run = open_run_dir(
        Path(out) if out else Path(cfg.run.out_dir) / cfg.run.name, task.dump_config(cfg), resume,
        cfg.run.device, cfg.run.threads, log, list(cfg.run.seeds),
        cfg.data.split_seed,
    )
    data = task.load_data(cfg, run)
    teacher = task.build_teacher(cfg, data, run)
    return train_students(task, cfg, config, overrides, data, teacher, run)


def train_students(task, cfg, config, overrides: tuple[str, ...], data, teacher, run: RunDir) -> RunResult:
    """Everything after the teacher, in an open run directory: [distill.auto's choice,] the seeds' phases, the best
    seed, the evaluation, the kept student, metrics.json, history.json and the report. config and overrides are
    what cfg was loaded from (auto's trials load variants of them). kdkit sweep calls it once per student."""
    auto = None
    if search_auto.wanted(cfg):  # no-regret: how much to distil is chosen on validation first
        cfg, auto = search_auto.choose(task, config, overrides, cfg, data, teacher, run)
    recipe = task.recipe(cfg, data, teacher, run)
    results = run_phases(run, list(cfg.run.seeds), recipe)
    best, chosen = best_seed(results["student"], recipe.selection)
    metrics: dict = {}
    if run.is_main:  # one process evaluates and writes; the others wait at the barrier
        metrics, extras = task.evaluate(cfg, data, teacher, results, run, chosen, recipe)
        if auto is not None:
            metrics["auto"] = auto
        task.save_student(best.model, run.path / "student", data, cfg)
        histories = collect_histories(run, results)
        run.write_json("metrics.json", metrics)
        run.write_json("history.json", histories)
        task.report(cfg, run, metrics, histories, recipe, extras)
        if auto is not None:
            write_text(run.path / "report.md", (run.path / "report.md").read_text() + auto_section(metrics))
    run.barrier()
    return RunResult(run.path, metrics, best.model, teacher)


def evaluate_run(run_dir: str | Path, log: Log = print) -> dict:
    """Re-evaluate a finished run from its folder: its teacher and its kept student on the test split, exactly as
    the run measured them (writes RUN_DIR/eval.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a kdkit run directory (no config.yaml)")
    if not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} has no metrics.json; did the run finish?")
    task, cfg = load_task(run_dir / "config.yaml")
    run = RunDir.finished(run_dir, resolve_device(cfg.run.device), log)
    data = task.load_data(cfg, run)
    teacher = task.build_teacher(cfg, data, run)
    chosen = json.loads((run_dir / "metrics.json").read_text()).get("best_seed") or {}
    seed = chosen.get("seed", cfg.run.seeds[0])
    student = task.load_student(run_dir / "student")
    results = {"baseline": [], "student": [PhaseResult(Phase("student", seed), student, {})]}
    chosen = {**chosen, "phase": "student-s" + str(seed), "seed": seed}
    metrics, _ = task.evaluate(cfg, data, teacher, results, run, chosen, None)
    run.write_json("eval.json", metrics)
    return metrics


def cache_teacher(config: str | Path | dict, overrides: tuple[str, ...] = (), log: Log = print) -> dict:
    """`kdkit cache-teacher`: run the teacher once over the training data and store its outputs on disk, exactly
    as `kdkit train` would read them; returns the cache's figures."""
    task, cfg = load_task(config, overrides)
    if not callable(getattr(task, "cache_teacher", None)):
        raise ConfigError(f"data.task: {task.name} has no teacher cache; kdkit cache-teacher does not apply")
    init_processes(cfg.run.device)
    run = RunDir(Path(cfg.run.out_dir) / cfg.run.name, True, resolve_device(cfg.run.device), log)
    data = task.load_data(cfg, run)
    return task.cache_teacher(cfg, data, task.build_teacher(cfg, data, run), run)
