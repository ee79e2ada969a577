"""The pipeline wired end to end in-process on a tiny setting: metrics contract, phases reused on resume, a phase
cut short continues from its checkpoint, the chosen student is the one saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kdkit.config import load_config
from kdkit.errors import TrainingError
from kdkit.evaluate.schema import check_metrics
from kdkit.models import load_model_folder
from kdkit.pipeline import distill

TINY = {
    "run": {"name": "tiny", "seeds": [0, 1], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 400},
    "teacher": {
        "members": [
            {"model": {"name": "mlp", "kwargs": {"hidden": [32]}}},
            {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "weight": 0.5},
        ],
        "train": {"epochs": 2, "batch_size": 32},
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2, "batch_size": 32},
    "eval": {"latency_repeats": 2, "latency_warmup": 0},
}


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    return load_config(TINY)


def test_metrics_contract_and_saved_student(cfg, tmp_path):
    r = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    check_metrics(m)
    keys = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "agreement", "ece"}
    cost_keys = {"params", "size_mb", "latency_ms", "throughput", "speedup_latency", "speedup_throughput"}
    for model in ("teacher", "student", "baseline_student"):
        assert keys <= set(m[model]), model
        assert cost_keys <= set(m["cost"][model]), model
    assert m["cost"]["teacher"]["members"] == 2 and m["seeds"] == [0, 1]
    assert len(m["student"]["accuracy"]["per_seed"]) == 2
    cache = m["teacher_cache"]  # the disk cost of the cached teacher outputs: float32 logits per example
    assert cache["bytes"] == cache["examples"] * 10 * 4 and cache["views"] == 0
    assert "Teacher outputs were cached once on disk" in (tmp_path / "run" / "report.md").read_text()
    assert m["gain"]["accuracy"]["mean"] == pytest.approx(
        m["student"]["accuracy"]["mean"] - m["baseline_student"]["accuracy"]["mean"]
    )
    saved = load_model_folder(tmp_path / "run" / "student")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(saved(x), r.student.eval()(x))
    assert (tmp_path / "run" / "teachers" / "member_1" / "model.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"teacher-0", "teacher-1", "baseline-s0", "student-s1"} <= set(history)


def test_resume_reuses_finished_phases_and_continues_a_cut_phase(cfg, tmp_path):
    full = distill(cfg, out=tmp_path / "a", log=lambda m: None)
    keep_last = load_config(TINY, ["run.keep_checkpoints_after=last"])  # the default removes finished phases' ones
    distill(keep_last, out=tmp_path / "b", log=lambda m: None)
    # Cut the last student phase short: its result is gone, only its checkpoints remain.
    shutil.rmtree(tmp_path / "b" / "phases" / "student-s1")
    logs = []
    resumed = distill(keep_last, out=tmp_path / "b", resume=True, log=logs.append)
    assert any("teacher-0: finished earlier" in line for line in logs)
    assert any("student-s1: resumed from step_" in line for line in logs)
    for key in ("accuracy", "f1_macro"):
        assert resumed.metrics["student"][key] == full.metrics["student"][key]
        assert resumed.metrics["baseline_student"][key] == full.metrics["baseline_student"][key]


def test_resume_with_another_config_is_refused(cfg, tmp_path):
    distill(cfg, out=tmp_path / "a", log=lambda m: None)
    other = load_config(TINY, ["train.epochs=3"])
    with pytest.raises(TrainingError, match=r"--resume: the config differs .* in train\.epochs"):
        distill(other, out=tmp_path / "a", resume=True, log=lambda m: None)
