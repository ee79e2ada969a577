"""The run directory: created (or checked on --resume), env.json, and writes by the main process only.

Every task's run writes here through one RunDir, so that multi-process runs write each file once and every run
records the same environment keys. Layout shared by every task:
    config.yaml  env.json  metrics.json  history.json  report.md  plots/  tb/<phase>/
    student/  phases/<phase>/ (result.json + the model)  checkpoints/<phase>/  teachers/
checkpoints/<phase>/ holds the resumable state of a phase while it trains; once the phase's model and result.json
are saved it is removed, or reduced to the newest checkpoint (run.keep_checkpoints_after: none | last).
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdkit.atomic import write_json, write_text
from kdkit.engine.checkpoint import latest_checkpoint
from kdkit.engine.runtime import init_processes, is_main_process, resolve_device, wait_for_everyone, world_size
from kdkit.errors import TrainingError

Log = Callable[[str], None]
RESUME_MAY_CHANGE = ("run.progress", "run.threads", "run.keep_checkpoints_after")  # not what a run computes
KEEP_CHECKPOINTS = ("none", "last")  # run.keep_checkpoints_after
# What a fresh run in a used folder removes first when any of it is there (a kdkit run's own names).
RUN_MARKERS = ("metrics.json", "checkpoints", "phases", "teachers")


def _quiet(message: str) -> None:
    """The log of processes other than the main one."""


@dataclass
class RunDir:
    """An open run directory. `log` is the caller's log on the main process and silent elsewhere.
    resume: finished phases are reused and unfinished ones continue from their checkpoints. read_only: a finished
    run opened again (eval, export, serve): phases are only reused, never trained. keep_checkpoints: what
    `settle_checkpoints` keeps of a finished phase's checkpoints, "none" or "last"."""

    path: Path
    resume: bool
    device: str
    log: Log
    env: dict = field(default_factory=dict)
    read_only: bool = False
    keep_checkpoints: str = "none"

    @classmethod
    def finished(cls, path: Path, device: str, log: Log) -> RunDir:
        """A finished run directory, to read its teacher and student again."""
        return cls(path, True, device, log, read_only=True)

    @property
    def is_main(self) -> bool:
        return is_main_process()

    def phase_dir(self, phase: str) -> Path:
        return self.path / "phases" / phase

    def checkpoints(self, phase: str) -> Path:
        return self.path / "checkpoints" / phase

    def settle_checkpoints(self, phase: str) -> None:
        """Remove the resumable checkpoints of a phase whose model and result.json are saved, or keep only the
        newest one ("last"). Main process only; a read-only run changes nothing. Called after result.json is
        written, so that a crash in between leaves a finished phase (reused on --resume), never a lost one."""
        folder = self.checkpoints(phase)
        if self.read_only or not self.is_main or not folder.is_dir():
            return
        keep = newest_checkpoint(folder) if self.keep_checkpoints == "last" else None
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()  # checkpoints/ itself goes with its last phase
            return
        for item in folder.iterdir():
            if item in (keep, folder / "latest.json"):
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)

    def write_json(self, name: str | Path, obj: Any) -> None:
        """Written atomically by the main process only (the others skip it)."""
        if self.is_main:
            write_json(self.path / name, obj)

    def write_text(self, name: str | Path, text: str) -> None:
        if self.is_main:
            write_text(self.path / name, text)

    def barrier(self) -> None:
        wait_for_everyone()


def open_run_dir(path: Path, config_yaml: str, resume: bool, device: str, threads: int | None, log: Log,
                 seeds: list[int], split_seed: int) -> RunDir:
    """Start the processes, then create `path` (or, with resume, check it holds the same config) and write
    config.yaml (the resolved config) and env.json (versions, device, seeds, processes)."""
    init_processes(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    device = resolve_device(device)
    saved = path / "config.yaml"
    if resume and saved.is_file():
        changed = config_changes(yaml.safe_load(saved.read_text()), yaml.safe_load(config_yaml))
        if changed:
            raise TrainingError(
                f"--resume: the config differs from {saved} in {', '.join(changed[:5])}; "
                "resume with the same config, or start a new run directory"
            )
    elif resume:
        raise TrainingError(f"--resume: {path} holds no run (no config.yaml); drop --resume to start it")
    elif is_main_process() and any((path / name).exists() for name in RUN_MARKERS):
        shutil.rmtree(path)  # a fresh run in a used folder starts clean; stale phases must not be reused
    run = RunDir(path, resume, device, log if is_main_process() else _quiet, environment(device, seeds, split_seed),
                 keep_checkpoints=kept_checkpoints(yaml.safe_load(config_yaml)))
    if run.is_main:
        path.mkdir(parents=True, exist_ok=True)
    run.write_text("config.yaml", config_yaml)
    run.write_json("env.json", run.env)
    run.barrier()
    return run


def kept_checkpoints(config: dict | None) -> str:
    """run.keep_checkpoints_after of a resolved config; "none" for a task whose run section has no such setting
    (the tabular task writes no checkpoints). Read here from the config the run directory records, so that every
    task gets it without the pipeline naming a task's config."""
    value = ((config or {}).get("run") or {}).get("keep_checkpoints_after", "none")
    if value not in KEEP_CHECKPOINTS:
        raise TrainingError(f"run.keep_checkpoints_after: {value!r} is not one of {', '.join(KEEP_CHECKPOINTS)}")
    return value


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint that latest.json names in a phase's checkpoint folder; None when it names none that is
    complete (nothing worth keeping)."""
    try:
        return latest_checkpoint(folder)
    except TrainingError:
        return None


def config_changes(before: dict, after: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, except those a resume may change."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    fa, fb = flat(before or {}), flat(after or {})
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not k.startswith(RESUME_MAY_CHANGE)]


def environment(device: str, seeds: list[int], split_seed: int) -> dict:
    """env.json: the same keys for every task."""
    import accelerate
    import numpy
    import sklearn
    import torch

    from kdkit import __version__

    return {
        "kdkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "seeds": list(seeds),
        "processes": world_size(),
        "split_seed": split_seed,
    }
