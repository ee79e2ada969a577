"""Pruned causal-LM students (student.model.prune) through the real flow: built from the teacher's layers and then
narrowed by the importance of the run's own training text, the same for every seed, trained, saved and reloaded at
the pruned size; the importance is measured once; bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch
from tests.unit.tasks.test_causal_lm_task import lm_config

from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.models.prune_lm import lm_importance, prune_lm
from kdkit.pipeline import distill
from kdkit.tasks import TASKS
from kdkit.tasks.lm_student import LMStudents, calibration_batches

PRUNE = {"intermediate_size": 24, "num_key_value_heads": 1, "hidden_size": 24, "calibration_blocks": 5}


def built(corpus, teacher, tmp_path, student):
    cfg = load_config(lm_config(corpus, teacher, tmp_path, student=student))
    task = TASKS["causal_lm"]
    from kdkit.run import RunDir

    run = RunDir(tmp_path / "run", False, "cpu", lambda m: None)
    data = task.load_data(cfg, run)
    return cfg, data, task.build_teacher(cfg, data, run)


def test_pruned_student_is_the_teachers_layers_narrowed_by_the_training_texts_importance(lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    student = {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3], "prune": PRUNE}}
    cfg, data, ensemble = built(corpus, teacher, tmp_path, student)
    students = LMStudents(cfg, ensemble, data)
    a, b = students(0), students(1)
    assert a.config.num_hidden_layers == 2 and a.config.intermediate_size == 24
    assert a.config.num_key_value_heads == 1 and a.config.num_attention_heads == 2 and a.config.hidden_size == 24
    # The same weights for every seed (importance and layers do not depend on the seed), all trainable.
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad
    # By hand: the teacher's layers 0 and 3, pruned by the importance on the first five training blocks.
    from kdkit.models.causal_lm import student_from_teacher_lm

    layers = student_from_teacher_lm(ensemble.members[0].model, [0, 3], "here")
    batches = calibration_batches(data, 5)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(data.train.lengths[:5].sum())
    expected = prune_lm(layers, lm_importance(layers, batches), intermediate_size=24, num_key_value_heads=1,
                        hidden_size=24)
    for (name, p), q in zip(a.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name
    # The teacher is untouched and still frozen.
    assert all(not p.requires_grad for p in ensemble.members[0].model.parameters())


def test_importance_is_measured_once(lm_world, tmp_path, monkeypatch):
    import kdkit.models.prune_lm as prune_module

    corpus, teacher, _ = lm_world
    student = {"model": {"source": "hf", "path": str(teacher), "prune": {"intermediate_size": 16}}}
    cfg, data, ensemble = built(corpus, teacher, tmp_path, student)
    calls = []
    real = prune_module.lm_importance
    monkeypatch.setattr(prune_module, "lm_importance", lambda *a, **k: calls.append(1) or real(*a, **k))
    students = LMStudents(cfg, ensemble, data)
    model = students(0)
    students(1)
    assert len(calls) == 1
    # No teacher_layers: every layer of the teacher, MLP narrowed only.
    full = ensemble.members[0].model.config
    assert model.config.num_hidden_layers == full.num_hidden_layers and model.config.intermediate_size == 16
    assert model.config.hidden_size == full.hidden_size


def test_pruned_run_end_to_end_saves_the_pruned_student(lm_world, tmp_path):
    from transformers import AutoModelForCausalLM

    corpus, teacher, _ = lm_world
    student = {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3], "prune": PRUNE}}
    logs = []
    result = distill(lm_config(corpus, teacher, tmp_path, student=student, train={"epochs": 1}),
                     out=tmp_path / "run", log=logs.append)
    saved = AutoModelForCausalLM.from_pretrained(str(result.run_dir / "student"))
    assert saved.config.hidden_size == 24 and saved.config.intermediate_size == 24
    assert result.metrics["student"]["perplexity"] > 1.0 and result.metrics["baseline_student"]["perplexity"] > 1.0
    assert any(m.startswith("pruned student:") for m in logs)


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"model": {"source": "hf", "path": "x", "prune": {"hidden_size": 0}}}, "hidden_size"),
        ({"model": {"source": "hf", "path": "x", "pretrained": False, "prune": {"hidden_size": 8}}},
         "prune needs source: hf with pretrained weights"),
        ({"model": {"source": "builtin", "name": "mlp", "prune": {"hidden_size": 8}}}, "prune needs source: hf"),
        ({"model": {"source": "hf", "path": "x", "prune": {"hidden_sise": 8}}}, "hidden_sise"),
    ],
)
def test_bad_prune_settings_are_refused(lm_world, tmp_path, student, message):
    corpus, teacher, _ = lm_world
    with pytest.raises(ConfigError, match=message):
        load_config(lm_config(corpus, teacher, tmp_path, student=student))


def test_a_width_beyond_the_teachers_is_one_line(lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    student = {"model": {"source": "hf", "path": str(teacher), "prune": {"intermediate_size": 10_000}}}
    cfg, data, ensemble = built(corpus, teacher, tmp_path, student)
    with pytest.raises(ConfigError, match=r"student\.model\.prune\.intermediate_size: 10000; expected 1\.\.64"):
        LMStudents(cfg, ensemble, data)(0)


def test_prune_on_a_classification_config_is_refused():
    raw = {
        "data": {"source": "builtin", "name": "digits"},
        "teacher": {"members": [{"model": {"source": "builtin", "name": "mlp"}}]},
        "student": {"model": {"source": "hf", "path": "x", "prune": {"hidden_size": 8}}},
    }
    with pytest.raises(ConfigError, match="needs data.task: causal_lm"):
        load_config(raw)
