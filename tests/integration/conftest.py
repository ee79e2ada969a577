"""Shared pieces of the integration tests: a tiny config, ways to run the CLI, and one finished run.

Two ways to run the CLI:
  * `run_subprocess` runs `python -m kdkit ...` as a user would. It is the faithful check (exit code, what a
    user sees on stderr, no traceback) but every call pays ~3–5 s of imports (torch, scikit-learn) on a busy CPU.
  * `run_in_process` calls `kdkit.cli.main(argv)` and captures stdout/stderr. It goes through the same error
    mapping (KdkitError → "error: ..." and exit 2) and costs milliseconds once torch is imported, so the many
    bad-input cases use it; a few of them are also run as real processes.

Every test (and every process it starts) is offline and keeps its teacher-output cache under pytest's tmp dir.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# Offline for this process and every process it starts. Set at import, before any library that reads them
# (huggingface_hub reads HF_HUB_OFFLINE when imported) is loaded.
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

# Only for the CLI runs (kept out of os.environ so other test folders see their usual environment): rich wraps
# console output at 80 columns when stdout is not a terminal; wide lines keep the loss formula and file paths on
# one line, so substring checks do not depend on wrapping. KDKIT_DEBUG would turn the one-line errors that these
# tests check into tracebacks.
CLI_ENV = {"COLUMNS": "200"}
CLI_ENV_REMOVED = ("KDKIT_DEBUG",)

# A config that trains in a few seconds on CPU: digits (1,797 8×8 images), a 32-unit MLP teacher, an 8-unit MLP
# student, one seed, 2 epochs each, almost no latency timing. The teacher cache folder is filled in per test.
TINY: dict = {
    "run": {"name": "tiny", "seeds": [0], "progress": False},
    "data": {"source": "builtin", "name": "digits"},
    "teacher": {
        "members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}],
        "train": {"epochs": 2},
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2},
    "eval": {"latency_repeats": 3, "latency_warmup": 1},
}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def first_error_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[0] if lines else ""

    def describe(self) -> str:
        """For assertion messages: everything the command printed."""
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def run_subprocess(args: list[str], cwd: Path, timeout: float = 180) -> CliResult:
    """`python -m kdkit ARGS` in `cwd`, with this process's (offline) environment."""
    done = subprocess.run(
        [sys.executable, "-m", "kdkit", *map(str, args)],
        cwd=cwd,
        env={**{k: v for k, v in os.environ.items() if k not in CLI_ENV_REMOVED}, **CLI_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def run_in_process(args: list[str]) -> CliResult:
    """`kdkit.cli.main(ARGS)` in this process (the caller sets the working directory)."""
    from kdkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def tiny_config(cache_dir: Path, **sections) -> dict:
    """TINY with the teacher cache under `cache_dir`; keyword arguments replace whole sections."""
    cfg = copy.deepcopy(TINY)
    cfg["distill"]["cache_dir"] = str(cache_dir)
    cfg.update(copy.deepcopy(sections))
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """KDKIT_CACHE_DIR under pytest's tmp dir for this process and its children, restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDKIT_CACHE_DIR", str(tmp_path_factory.mktemp("kdkit-cache")))
        yield


@pytest.fixture
def cli(tmp_path, monkeypatch) -> Callable[..., CliResult]:
    """Run the CLI in this process, in tmp_path (relative paths in configs resolve there)."""
    monkeypatch.chdir(tmp_path)
    for key, value in CLI_ENV.items():
        monkeypatch.setenv(key, value)
    for key in CLI_ENV_REMOVED:
        monkeypatch.delenv(key, raising=False)
    return lambda *args: run_in_process(list(args))


@pytest.fixture
def cli_process(tmp_path) -> Callable[..., CliResult]:
    """Run the CLI as a real process, in tmp_path."""
    return lambda *args: run_subprocess(list(args), cwd=tmp_path)


@pytest.fixture
def make_config(tmp_path) -> Callable[..., Path]:
    """make_config(mutate=None, name=...) writes the tiny config (after `mutate(cfg)`) and returns its path."""

    def make(mutate: Callable[[dict], object] | None = None, name: str = "config.yaml") -> Path:
        cfg = tiny_config(tmp_path / "teacher-cache")
        if mutate is not None:
            mutate(cfg)
        return write_yaml(tmp_path / name, cfg)

    return make


@dataclass
class FinishedRun:
    config: Path  # the tiny config (train.epochs 2; the run used --set train.epochs=1)
    run_dir: Path
    result: CliResult  # what `kdkit train` printed
    overrides: tuple[str, ...] = ("--set", "train.epochs=1")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> FinishedRun:
    """One real `kdkit train CONFIG --out DIR --set train.epochs=1`, shared by the tests that read a run dir.
    Tests that change a run directory (resume) work on a copy."""
    base = tmp_path_factory.mktemp("finished")
    config = write_yaml(base / "tiny.yaml", tiny_config(base / "teacher-cache"))
    run_dir = base / "run"
    result = run_subprocess(["train", config, "--out", run_dir, "--set", "train.epochs=1"], cwd=base)
    assert result.returncode == 0, result.describe()
    return FinishedRun(config, run_dir, result)


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Callable[..., Path]:
    """digits_csv(classes=None) writes scikit-learn's digits as a CSV (columns p0..p63, label), optionally only
    the given classes, and returns its path. 64 features: a model trained on it takes digits' (1, 8, 8) input."""
    import pandas as pd
    from sklearn.datasets import load_digits

    base = tmp_path_factory.mktemp("csv")
    digits = load_digits()
    frame = pd.DataFrame(digits.data, columns=[f"p{i}" for i in range(64)])
    frame["label"] = digits.target

    def write(classes: list[int] | None = None, name: str = "digits.csv") -> Path:
        part = frame if classes is None else frame[frame["label"].isin(classes)]
        path = base / name
        part.to_csv(path, index=False)
        return path

    return write


@pytest.fixture(scope="session")
def three_class_run(tmp_path_factory, digits_csv) -> Path:
    """A finished tiny run on digits 0–2 only (a 3-class data set with digits' 64 inputs); its student/ folder
    is a kdkit model that outputs 3 classes. Trained in this process (one epoch, no baseline): ~1 s."""
    base = tmp_path_factory.mktemp("three-class")
    cfg = tiny_config(
        base / "teacher-cache",
        data={"source": "csv", "path": str(digits_csv([0, 1, 2], "digits012.csv"))},
        student={"model": {"name": "mlp", "kwargs": {"hidden": [8]}}, "baseline": False},
    )
    cfg["run"]["tensorboard"] = False
    cfg["teacher"]["train"]["epochs"] = 1
    cfg["train"]["epochs"] = 1
    config = write_yaml(base / "three.yaml", cfg)
    result = run_in_process(["train", config, "--out", base / "run"])
    assert result.returncode == 0, result.describe()
    assert json.loads((base / "run" / "student" / "model.json").read_text())["num_classes"] == 3
    return base / "run"
