"""Hyperparameter search on Optuna: sampling overrides from a declared space, a resumable SQLite study, plots."""

from kdkit.search.study import open_study, sample_overrides, search_plots, trial_table

__all__ = ["open_study", "sample_overrides", "search_plots", "trial_table"]
