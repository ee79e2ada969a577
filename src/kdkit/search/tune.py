"""`kdkit search`: tune the values declared in `search.space` with Optuna, for any task with validation metrics.

The teacher is built (or loaded) once and shared. Each trial trains the distilled student for every search seed
and scores the mean best validation metric; the last-epoch value is recorded beside it. The study is stored in
RUN_DIR/search.db: running the same command again continues it. Writes RUN_DIR/search/{trials.json, summary.json,
*.png} and RUN_DIR/best_config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdkit.atomic import write_json, write_text
from kdkit.config import read_yaml
from kdkit.errors import ConfigError, TrainingError
from kdkit.run import RunDir, open_run_dir, run_phases
from kdkit.tasks import load_task

FIXED_IN_SEARCH = ("teacher.", "data.", "search.", "run.seeds", "run.out_dir", "run.name")
Log = Callable[[str], None]


def search(config: str | Path | dict, *, out: str | Path | None = None, overrides: tuple[str, ...] = (),
           trials: int | None = None, log: Log = print) -> dict:
    """Run (or continue) the study; return the summary (best trial, counts, best config path, plots)."""
    from kdkit.search.study import finished, open_study

    raw = read_yaml(config) if not isinstance(config, dict) else dict(config)
    task, cfg = load_task(raw, overrides)
    space = checked_space(task, cfg, raw, overrides)
    run_dir = Path(out) if out else Path(cfg.run.out_dir) / f"{cfg.run.name}-search"
    storage = run_dir / "search.db"
    run = open_run_dir(run_dir, task.dump_config(cfg), storage.is_file(), cfg.run.device, cfg.run.threads, log,
                       list(cfg.run.seeds), cfg.data.split_seed)
    data = task.load_data(cfg, run)
    if getattr(data, "val", None) is None:
        raise ConfigError("data.val_fraction: a search scores trials on the validation split; set it above 0")
    teacher = task.build_teacher(cfg, data, dataclasses.replace(run, resume=True))  # members trained once
    sc = cfg.search
    direction = "minimize" if sc.metric == "loss" else "maximize"
    study = open_study(storage, cfg.run.name, direction, sc.sampler_seed, sc.pruner, sc.sampler)
    budget = trials or sc.trials
    objective = make_objective(task, raw, overrides, space, data, teacher, run, direction)
    remaining = max(0, budget - finished(study))
    if remaining < budget:
        log(f"search: resuming {storage} ({finished(study)} trials done, {remaining} to go)")
    study.optimize(objective, n_trials=remaining, catch=(TrainingError,))
    return summarize(study, task, raw, overrides, run_dir, sc.metric, direction)


def checked_space(task, cfg, raw: dict, overrides) -> dict:
    """The search space as plain dicts; every path must name a real config value that accepts the sampled values,
    and the metric must be one the task validates with."""
    if not task.search_metrics:
        raise ConfigError(f"search: a {task.name} run has no validation metric to search on; kdkit search tunes "
                          "classification and causal_lm runs")
    sc = cfg.search
    if not sc.space:
        raise ConfigError(
            "search.space: empty; declare what to tune, e.g. train.lr: {low: 1e-4, high: 1e-2, log: true}"
        )
    if sc.metric not in task.search_metrics:
        expected = ", ".join(task.search_metrics)
        raise ConfigError(f"search.metric: {sc.metric!r} for a {task.name} run; expected one of: {expected}")
    space = {path: p.model_dump(exclude_none=True) for path, p in sc.space.items()}
    for path, p in space.items():
        if path.startswith(FIXED_IN_SEARCH):
            raise ConfigError(f"search.space.{path}: the teacher, the data and the run layout stay fixed in a search")
        for value in p.get("choices") or [p["low"], p["high"]]:
            try:
                task.load_config(raw, (*overrides, f"{path}={json.dumps(value)}"))
            except ConfigError as exc:
                raise ConfigError(f"search.space.{path}: {exc.details[0] if exc.details else exc}") from None
    return space


def make_objective(task, raw: dict, overrides, space: dict, data, teacher, run: RunDir, direction: str):
    """One trial: its overrides sampled from the space, the distilled student for every search seed."""
    from kdkit.search.study import sample_overrides

    cfg = task.load_config(raw, overrides)
    sc = cfg.search
    return trial_objective(task, raw, overrides, lambda trial: sample_overrides(trial, space), data, teacher, run,
                           sc.metric, direction, sc.seeds or cfg.run.seeds)


def trial_objective(task, raw: dict, overrides, suggest: Callable, data, teacher, run: RunDir, metric: str,
                    direction: str, seeds):
    """The objective of a study whose trials are config overrides: suggest(trial) → ["path=value", ...]; each
    trial trains the distilled student for every seed in RUN_DIR/trials/trial_NNNN, is pruned on the first seed's
    per-epoch validation curve, and scores the mean over seeds of the best validation `metric`."""
    import optuna

    def objective(trial: optuna.Trial) -> float:
        trial_overrides = suggest(trial)
        tcfg = task.load_config(raw, (*overrides, *trial_overrides, f"run.seeds={json.dumps(list(seeds))}",
                                      "run.progress=false"))
        run.log(f"trial {trial.number}: " + " ".join(trial_overrides))

        def on_epoch(phase: str, epoch: int, metrics: dict) -> None:
            if phase == f"student-s{seeds[0]}":
                trial.report(metrics[metric], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        trial_run = RunDir(run.path / "trials" / f"trial_{trial.number:04d}", False, run.device, lambda m: None)
        recipe = dataclasses.replace(task.recipe(tcfg, data, teacher, trial_run, on_epoch), kinds=["student"])
        try:
            results = run_phases(trial_run, list(seeds), recipe)
        finally:
            shutil.rmtree(trial_run.path / "checkpoints", ignore_errors=True)
        stats = trial_stats(results["student"], metric, direction, trial_overrides)
        for k, v in stats.items():
            trial.set_user_attr(k, v)
        run.log(
            f"trial {trial.number}: {metric} best {stats['best_mean']:.4f} ± {stats['best_std']:.4f}, "
            f"last epoch {stats['last_mean']:.4f} ± {stats['last_std']:.4f}"
        )
        return stats["best_mean"]

    return objective


def trial_stats(results, metric: str, direction: str, trial_overrides: list[str]) -> dict:
    best, last = [], []
    for r in results:
        values = [h[f"val/{metric}"] for h in r.history if f"val/{metric}" in h]
        best.append(min(values) if direction == "minimize" else max(values))
        last.append(values[-1])
    return {
        "best_mean": float(np.mean(best)),
        "best_std": float(np.std(best)),
        "last_mean": float(np.mean(last)),
        "last_std": float(np.std(last)),
        "per_seed_best": best,
        "overrides": trial_overrides,
    }


def summarize(study, task, raw: dict, overrides, run_dir: Path, metric: str, direction: str) -> dict:
    """trials.json, plots, best_config.yaml and summary.json; refuses a study with no complete trial."""
    from kdkit.search.study import search_plots, trial_table

    rows = trial_table(study)
    out_dir = run_dir / "search"
    write_json(out_dir / "trials.json", rows)
    plots = search_plots(study, out_dir)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        raise TrainingError(f"search: no trial completed ({len(rows)} pruned or failed); see {out_dir / 'trials.json'}")
    best = complete[0]
    write_text(run_dir / "best_config.yaml", task.dump_config(task.load_config(raw, (*overrides, *best["overrides"]))))
    summary = {
        "metric": metric,
        "direction": direction,
        "best": best,
        "trials": len(rows),
        "complete": len(complete),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "best_config": str(run_dir / "best_config.yaml"),
        "plots": [str(p) for p in plots],
    }
    write_json(out_dir / "summary.json", summary)
    return summary
