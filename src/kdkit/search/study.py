"""The study mechanics, independent of what a trial trains.

A search space maps dotted config paths to ranges or choices (config.SearchParam). Each trial turns its samples
into `--set`-style overrides; the pipeline builds the trial's config from them and trains. The study lives in
an SQLite file, so a search that is stopped (or killed) continues where it was: finished trials are kept,
and a trial that was running when the process died is marked failed and not counted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna

from kdkit.atomic import write_with

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample_overrides(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> list[str]:
    """One sample of every parameter, as overrides "path=value" (values written as YAML/JSON)."""
    overrides = []
    for path, p in space.items():
        if p.get("choices") is not None:
            # Optuna's categorical values must be primitives; lists such as [64, 32] are chosen by position.
            choices = p["choices"]
            labels = [json.dumps(c) for c in choices]
            value = choices[labels.index(trial.suggest_categorical(path, labels))]
        elif p.get("integer"):
            value = trial.suggest_int(
                path, int(p["low"]), int(p["high"]), step=int(p.get("step") or 1), log=bool(p.get("log"))
            )
        else:
            value = trial.suggest_float(
                path, float(p["low"]), float(p["high"]), step=p.get("step"), log=bool(p.get("log"))
            )
        overrides.append(f"{path}={json.dumps(value)}")
    return overrides


def open_study(
    storage_file: Path, name: str, direction: str, seed: int, pruner: str, sampler: str = "tpe"
) -> optuna.Study:
    """Create or load the study in `storage_file`; trials left running by a killed search are marked failed."""
    storage_file.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_file}")
    samplers = {"tpe": optuna.samplers.TPESampler(seed=seed), "random": optuna.samplers.RandomSampler(seed=seed)}
    pruners = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "none": optuna.pruners.NopPruner(),
    }
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=direction,
        load_if_exists=True,
        sampler=samplers[sampler],
        pruner=pruners[pruner],
    )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def finished(study: optuna.Study) -> int:
    """Trials that count towards the budget: complete or pruned."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def trial_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as a plain record, best first (complete trials by value, then pruned and failed ones)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                **{k: v for k, v in t.user_attrs.items()},
            }
        )
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(rows, key=lambda r: (r["state"] != "COMPLETE", sign * (r["value"] or 0.0), r["number"]))


def search_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """optimisation_history.png and param_importances.png (the latter needs two or more complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    drawn = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    makers = [("optimisation_history.png", ovm.plot_optimization_history, 1)]
    if complete and study.best_trial.params:
        makers.append(("param_importances.png", ovm.plot_param_importances, 2))
    for name, make, needed in makers:
        if len(complete) < needed:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                ax = make(study)
            except (ValueError, RuntimeError):  # e.g. importances when every trial has the same value
                plt.close("all")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(7, 4.2)
        drawn.append(
            write_with(out_dir / name, lambda p, fig=fig: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        )
        plt.close(fig)
    return drawn
