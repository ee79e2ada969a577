"""The real CLI, end to end, as a user runs it: `python -m kdkit VERB ...` in a subprocess.

The expensive part, one `kdkit train` of the tiny config, runs once per session (conftest.finished_run);
the tests here read its run directory, re-evaluate it and resume it. The shipped configs are validated in this
process (see test_validate_shipped_config); everything else runs as a real process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VERBS = ["demo", "train", "validate", "eval", "config-docs"]
SECTIONS = ["run", "data", "teacher", "student", "distill", "train", "eval"]
MODEL_KEYS = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "agreement", "ece"]
COST_KEYS = ["params", "size_mb", "latency_ms", "throughput", "speedup_latency", "speedup_throughput"]
PLOTS = ["comparison.png", "loss_parts.png", "val_accuracy.png", "reliability.png", "confusion.png"]
FORMULA = "total = 0.1*ce + 0.9*soft_kl(T=4)"  # the default distill.losses of the tiny config


def shipped_configs() -> list[Path]:
    """Every YAML under the repo's configs/ (may be empty) and the configs shipped inside the package; not the
    Accelerate launcher configs in configs/accelerate/, which are Accelerate's format, not kdkit's."""
    found: list[Path] = []
    for folder in (REPO / "configs", REPO / "src" / "kdkit" / "configs"):
        if folder.is_dir():
            found += sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml"))
    return [p for p in found if "accelerate" not in p.relative_to(REPO).parts]


def test_help_lists_every_verb(cli_process):
    result = cli_process("--help")
    assert result.returncode == 0, result.describe()
    for verb in VERBS:
        assert verb in result.stdout, f"--help does not list {verb!r}\n{result.stdout}"


def test_validate_tiny_config(cli_process, make_config):
    config = make_config()
    result = cli_process("validate", config)
    assert result.returncode == 0, result.describe()
    assert "ok" in result.stdout


def test_package_ships_configs():
    assert any(p.parent == REPO / "src" / "kdkit" / "configs" for p in shipped_configs())


@pytest.mark.parametrize("config", shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_validate_shipped_config(config, cli):
    # In this process (kdkit.cli.main, the same code path as the binary): a subprocess per config costs ~3 s of
    # imports each, and the folder grows; test_validate_tiny_config covers `kdkit validate` as a real process.
    result = cli("validate", config)
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip().endswith("ok")


def test_train_writes_the_run_directory_contract(finished_run):
    run = finished_run.run_dir

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(SECTIONS) <= set(resolved), f"config.yaml lacks sections: {set(SECTIONS) - set(resolved)}"

    env = json.loads((run / "env.json").read_text())
    for key in ("torch", "seeds", "device"):
        assert key in env, f"env.json lacks {key!r}: {sorted(env)}"
    assert env["seeds"] == [0]

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("teacher", "student", "baseline_student", "gain"):
        assert key in metrics, f"metrics.json lacks {key!r}: {sorted(metrics)}"
    for key in ("teacher", "student", "baseline_student"):
        assert key in metrics["cost"], f"metrics.json's cost lacks {key!r}"
    for model in ("teacher", "student", "baseline_student"):
        for key, value in [(k, metrics[model].get(k)) for k in MODEL_KEYS] + [
            (k, metrics["cost"][model].get(k)) for k in COST_KEYS
        ]:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{model}.{key} = {value!r}"
            assert math.isfinite(value), f"{model}.{key} = {value!r}"
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0

    assert "total = " in (run / "report.md").read_text()
    for name in PLOTS:
        assert (run / "plots" / name).is_file(), f"plots/{name} missing: {sorted(p.name for p in run.glob('plots/*'))}"
    assert (run / "student" / "model.safetensors").is_file()
    assert (run / "student" / "model.json").is_file()
    assert not (run / "checkpoints").exists(), "a finished run keeps no resumable checkpoints by default"
    assert "## Run directory" in (run / "report.md").read_text()
    assert list((run / "tb").rglob("events.out.tfevents*")), "tb/ has no TensorBoard event files"


def test_train_prints_the_loss_formula(finished_run):
    assert FORMULA in finished_run.result.stdout, finished_run.result.describe()


def test_set_override_reaches_the_resolved_config(finished_run):
    assert yaml.safe_load(finished_run.config.read_text())["train"]["epochs"] == 2
    resolved = yaml.safe_load((finished_run.run_dir / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1
    history = json.loads((finished_run.run_dir / "history.json").read_text())
    epochs = [r["epoch"] for r in history["student-s0"]]
    assert max(epochs) == pytest.approx(1.0), "the student trained for more than the one epoch set by --set"


def test_eval_reproduces_the_student_accuracy(finished_run, cli_process):
    run = finished_run.run_dir
    result = cli_process("eval", run)
    assert result.returncode == 0, result.describe()
    evaluated = json.loads((run / "eval.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    # One seed: the saved student is the one metrics.json measured, on the same deterministic test split.
    assert evaluated["student"]["accuracy"] == pytest.approx(trained["student"]["accuracy"], abs=1e-9)


def test_resume_of_a_finished_run_reuses_every_phase(finished_run, cli_process, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run)
    before = json.loads((run / "metrics.json").read_text())
    result = cli_process("train", finished_run.config, "--out", run, *finished_run.overrides, "--resume")
    assert result.returncode == 0, result.describe()
    for phase in ("teacher-0", "baseline-s0", "student-s0"):
        assert f"{phase}: finished earlier, reusing" in result.stdout, result.describe()
    after = json.loads((run / "metrics.json").read_text())
    for model in ("teacher", "student", "baseline_student"):
        assert after[model]["accuracy"] == pytest.approx(before[model]["accuracy"], abs=1e-9)


def test_config_docs_matches_docs_folder(cli_process):
    result = cli_process("config-docs")
    assert result.returncode == 0, result.describe()
    docs = REPO / "docs" / "config.md"
    if docs.is_file():
        assert result.stdout == docs.read_text(), "docs/config.md is stale: kdkit config-docs > docs/config.md"
    else:
        assert result.stdout.startswith("# Configuration reference")
