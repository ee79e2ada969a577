"""The phase runner: for each seed, each kind of student (baseline, distilled), trained or reused on --resume.

A phase trains one network and leaves RUN_DIR/phases/<phase>/ with the model (saved by the task) and result.json
(its history and summary). What differs per task (how to train, save and load a model) comes in a Recipe.
A phase is finished when its result.json exists (written last, atomically): that alone makes --resume reuse it.
Its resumable checkpoints (RUN_DIR/checkpoints/<phase>/, where the task points the engine) are then removed or
reduced to the newest one (RunDir.settle_checkpoints), so a finished run keeps weights, not optimizer states.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.atomic import write_json
from kdkit.errors import TrainingError
from kdkit.run.run_dir import RunDir

KINDS = (("baseline", "baseline_student"), ("student", "student"))  # phase kind → metrics.json key
FIRST_SEED = "first seed (no validation metric)"  # best_seed's "by" when no validation figure chose it


@dataclass(frozen=True)
class Phase:
    """One network to train: kind "baseline" (labels or text alone), "student" (distilled) or "teacher-<i>"."""

    kind: str
    seed: int
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}-s{self.seed}")


@dataclass
class PhaseResult:
    """A trained (or reused) phase: the model (CPU) and its summary (history, val_score, best_epoch, ...)."""

    phase: Phase
    model: Any
    summary: dict

    @property
    def history(self) -> list[dict]:
        return self.summary.get("history", [])


@dataclass
class Recipe:
    """What a task hands to the phase runner.

    kinds: the phase kinds per seed, in order. train(phase) -> (model, summary). save(model, folder) and
    load(folder) -> model keep a finished phase on disk. formula: the distillation loss as printed.
    selection: (validation metric, "max" | "min", "best" | "last") that picks the best seed: its value at the
    kept epoch ("best" when the engine restores the best epoch, "last" when it keeps the last); None: the first seed.
    info: the task's own figures for metrics.json (e.g. the teacher cache's size).
    """

    kinds: list[str]
    train: Callable[[Phase], tuple[Any, dict]]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    formula: str = ""
    selection: tuple[str, str, str] | None = None
    info: dict = field(default_factory=dict)


def run_phases(run: RunDir, seeds: list[int], recipe: Recipe) -> dict[str, list[PhaseResult]]:
    """{kind: [PhaseResult per seed]} for every kind of the recipe; finished phases are reused on --resume."""
    results: dict[str, list[PhaseResult]] = {kind: [] for kind in ("baseline", "student", *recipe.kinds)}
    for seed in seeds:
        for kind in recipe.kinds:
            results[kind].append(run_phase(run, Phase(kind, seed), recipe))
    return results


def run_phase(run: RunDir, phase: Phase, recipe: Recipe, folder: Path | None = None) -> PhaseResult:
    """Train one phase, or reuse it when a resumed run already finished it (its result.json exists; checkpoints
    play no part). Saved by the main process: the model, then result.json, then the checkpoints are settled, so
    that a crash at any point leaves the phase either finished or resumable."""
    folder = folder or run.phase_dir(phase.name)
    done = folder / "result.json"
    if run.resume and done.is_file():
        run.log(f"{phase.name}: finished earlier, reusing {folder}")
        run.settle_checkpoints(phase.name)  # left over when a run stopped between result.json and settling
        return PhaseResult(phase, recipe.load(folder), json.loads(done.read_text()))
    if run.read_only:
        raise TrainingError(f"RUN_DIR: {folder} holds no finished {phase.name}; did the run finish?")
    model, summary = recipe.train(phase)
    if run.is_main:
        recipe.save(model, folder)
        write_json(done, summary)
        run.settle_checkpoints(phase.name)
    run.barrier()
    return PhaseResult(phase, model, summary)


def phase_summary(result) -> dict:
    """result.json of a phase trained by the engine (a kdkit.engine.TrainResult)."""
    return {
        "history": result.history,
        "val_score": result.best_value,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "seconds": result.seconds,
        "stopped_early": result.stopped_early,
    }


def best_seed(results: list[PhaseResult], selection: tuple[str, str, str] | None) -> tuple[PhaseResult, dict]:
    """The seed whose student is kept (RUN_DIR/student, export, serve): the best validation value of `selection`
    in its own direction ("max": accuracy, "min": loss); the first seed when there is no selection or no value."""
    if selection is None:
        first = results[0].phase
        return results[0], {"phase": first.name, "seed": first.seed, "by": FIRST_SEED, "value": None}
    metric, direction, which = selection
    sign = 1.0 if direction == "max" else -1.0

    def score(r: PhaseResult) -> float:
        values = [sign * h[f"val/{metric}"] for h in r.history if f"val/{metric}" in h]
        if not values:
            return -math.inf
        return max(values) if which == "best" else values[-1]

    best = max(results, key=score)  # ties: the first seed
    value = score(best)
    return best, {
        "phase": best.phase.name,
        "seed": best.phase.seed,
        "by": f"val/{metric}",
        "value": None if math.isinf(value) else sign * value,
    }


def collect_histories(run: RunDir, results: dict[str, list[PhaseResult]]) -> dict[str, list[dict]]:
    """history.json: phase name → records, for teacher members trained by this run (teachers/<member>/) and
    every student phase."""
    out = {}
    for done in sorted((run.path / "teachers").glob("*/result.json")):
        out[f"teacher-{done.parent.name.rsplit('_', 1)[-1]}"] = json.loads(done.read_text()).get("history", [])
    return out | {r.phase.name: r.history for rows in results.values() for r in rows}
