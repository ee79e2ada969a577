"""Hyperparameter search on Optuna: sampling overrides from a declared space, a resumable SQLite study, plots
(study.py), and the search over any task's distilled student (tune.py)."""

from kdkit.search.study import open_study, sample_overrides, search_plots, trial_table
from kdkit.search.tune import search

__all__ = ["open_study", "sample_overrides", "search", "search_plots", "trial_table"]
