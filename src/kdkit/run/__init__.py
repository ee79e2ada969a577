"""What every task shares around training: the run directory (run_dir.py) and the phase runner (phases.py).

Imports only the engine and below; never a task or the pipeline (they hand in what differs as callables)."""

from __future__ import annotations

from kdkit.run.phases import Phase, PhaseResult, Recipe, best_seed, collect_histories, run_phases
from kdkit.run.run_dir import RunDir, open_run_dir

__all__ = ["Phase", "PhaseResult", "Recipe", "RunDir", "best_seed", "collect_histories", "open_run_dir", "run_phases"]
