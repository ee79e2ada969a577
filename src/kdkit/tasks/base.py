"""The Task protocol: what differs between distilling a classifier, a language model and a tabular model.

The pipeline (kdkit.pipeline) runs every task the same way, top to bottom:

    cfg      = task.load_config(path_or_mapping, overrides)
    data     = task.load_data(cfg, run)
    teacher  = task.build_teacher(cfg, data, run)           # trained here, loaded, or rebuilt from a finished run
    recipe   = task.recipe(cfg, data, teacher, run)          # how one phase trains, saves and loads its model
    results  = run_phases(run, seeds, recipe)                # shared: seeds × (baseline, student), resume
    best     = best_seed(results["student"], recipe.selection)
    metrics, extras = task.evaluate(cfg, data, teacher, results, run, best, recipe)  # one schema
    task.save_student(best.model, run.path / "student", data, cfg) ; task.report(...)

Everything else (the run directory, the phase runner, the best seed, metrics.json's schema, every CLI verb) is
shared. A new task is a new file in tasks/ and one line in TASKS.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from kdkit.run import PhaseResult, Recipe, RunDir

CACHE_OFF = (
    "distill.cache_teacher: false; kdkit cache-teacher builds the cache a run reads when it is true (classification "
    "and causal_lm runs)"
)
OnEpoch = Callable[[str, int, dict], None]  # (phase name, epoch, validation metrics): a search prunes through it


@runtime_checkable
class Task(Protocol):
    """One task. Methods take the task's own config object (validated, frozen) and the open run directory."""

    name: ClassVar[str]
    columns: ClassVar[list]  # headline metrics for the summary table: [(key, header, format)]
    search_metrics: ClassVar[tuple[str, ...]]  # validation metrics a search may optimise
    shipping: ClassVar[str | None]  # None: kdkit export/serve take its runs; else why not and what to use instead
    auto_switch: ClassVar[str]  # the config section whose `enabled` `kdkit train --auto` turns on

    def load_config(self, config: str | Path | dict, overrides: tuple[str, ...]) -> Any:
        """Read and validate a YAML file (or a mapping) with `--set` overrides; every problem at once."""

    def dump_config(self, cfg: Any) -> str:
        """The resolved config as YAML (config.yaml of the run)."""

    def check(self, cfg: Any) -> None:
        """`kdkit validate`: names and parameters against the registries, without data or training."""

    def load_data(self, cfg: Any, run: RunDir) -> Any:
        """The task's data (its splits never overlap; the test split is never trained on)."""

    def build_teacher(self, cfg: Any, data: Any, run: RunDir) -> Any:
        """The frozen teacher: loaded, trained here (as phases of the run), or reused from a finished run."""

    def recipe(self, cfg: Any, data: Any, teacher: Any, run: RunDir, on_epoch: OnEpoch | None = None) -> Recipe:
        """How each phase trains, saves and loads its model; which metric picks the best seed."""

    def evaluate(self, cfg: Any, data: Any, teacher: Any, results: dict[str, list[PhaseResult]], run: RunDir,
                 best: dict, recipe: Recipe | None = None) -> tuple[dict, dict]:
        """(metrics.json in the one schema, extras for the report) on the test split. best: the kept seed
        (run.best_seed's record); recipe: the one the phases trained with (None when a finished run is
        evaluated again)."""

    def save_student(self, model: Any, folder: Path, data: Any, cfg: Any) -> None:
        """RUN_DIR/student: the kept seed's student, loadable alone."""

    def load_student(self, folder: Path) -> Any:
        """The student saved by save_student (for eval, export and serve)."""

    def report(self, cfg: Any, run: RunDir, metrics: dict, histories: dict[str, list[dict]], recipe: Recipe,
               extras: dict) -> None:
        """report.md and plots in the run directory."""
