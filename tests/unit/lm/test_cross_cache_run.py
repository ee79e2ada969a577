"""The cache across tokenizers in a run (#14): `kdkit cache-teacher` builds it for a cross-tokenizer config, `kdkit
train` with distill.cache_teacher: true reads it and never runs the teacher while training, training from it needs
no teacher model at all (its weights gone), and the temperatures it cannot hold are refused in one line."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from kdkit.config import load_config
from kdkit.data.cross_cache import CrossTopKCache, text_fingerprint
from kdkit.data.lm import build_lm_data
from kdkit.engine import TrainOptions, train
from kdkit.errors import ConfigError
from kdkit.losses import build_loss
from kdkit.losses.hybrid_kl import shared_vocab
from kdkit.pipeline import cache_teacher, distill
from kdkit.run.cross_teacher import CachedCrossTeacher, cross_cache_key, teacher_tokens
from kdkit.tasks.causal_lm import CausalLM
from kdkit.teachers import Teacher, TeacherEnsemble


def cross_config(corpus, teacher, student_tokenizer, tmp_path, losses, **sections) -> dict:
    """As tests/unit/tasks/test_cross_tokenizer.py: the teacher folder with its tokenizer, a one-layer random-init
    student of its family with the other tokenizer (data.tokenizer), the cache on."""
    cfg = {
        "run": {"name": "cross", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu",
                "out_dir": str(tmp_path / "runs")},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "tokenizer": str(student_tokenizer),
                 "max_length": 24, "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "pretrained": False,
                              "kwargs": {"num_hidden_layers": 1}}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, *losses], "cache_teacher": True},
        "llm": {"prompt_tokens": 6, "report_samples": 1, "generation": {"max_new_tokens": 4}, "top_k": 16},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "keep_best": "loss"},
        "eval": {"batch_size": 8, "latency_repeats": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


LOSSES = [{"name": "hybrid_kl", "weight": 0.3, "params": {"temperature": 2.0}},
          {"name": "uld", "weight": 0.1, "params": {"temperature": 2.0}},
          {"name": "span_likelihood", "weight": 0.1}]


def test_cache_teacher_builds_it_and_training_reads_it_without_running_the_teacher(lm_world, tmp_path, monkeypatch):
    corpus, teacher, other = lm_world
    cfg = cross_config(corpus, teacher, other, tmp_path, LOSSES)
    said: list[str] = []
    info = cache_teacher(cfg, log=said.append)
    assert info["k"] == 16 and info["kd_temperature"] == 2.0 and info["tokens"] > 0
    assert 60 < info["bytes_per_token"] < 200  # 16 · (2 + 2) + 4 top-k, + 4 id, 8 offsets, 4 log-prob, + padding
    folders = list((tmp_path / "runs" / "cache").glob("lm-cross-topk-*-k16-T2"))
    assert len(folders) == 1 and (folders[0] / "cross.json").is_file()

    import kdkit.tasks.causal_lm as task

    training, calls = [False], []
    real_train, real_forward, real_logits = task.train, Teacher.forward, Teacher.logits

    def spy_train(*args, **kwargs):
        training[0] = True
        try:
            return real_train(*args, **kwargs)
        finally:
            training[0] = False

    def spy(real):
        def run(self, inputs):
            if training[0]:
                calls.append(tuple(inputs.shape))
            return real(self, inputs)
        return run

    monkeypatch.setattr(task, "train", spy_train)
    monkeypatch.setattr(Teacher, "forward", spy(real_forward))
    monkeypatch.setattr(Teacher, "logits", spy(real_logits))
    said.clear()
    result = distill(cfg, out=tmp_path / "run", log=said.append)
    assert any(s.startswith("teacher cache across tokenizers: reading") for s in said)  # built once, read here
    assert not any("teacher top-k cache: " in s and "blocks ×" in s for s in said)  # nothing was rebuilt
    assert calls == []  # the student trained on the cache alone
    m = result.metrics
    assert m["teacher_cache"]["k"] == 16 and math.isfinite(m["student"]["bits_per_byte"])
    history = (tmp_path / "run" / "history.json").read_text()
    assert all(f"train/{name}" in history for name in ("hybrid_kl", "uld", "span_likelihood"))


def test_training_from_the_cache_needs_no_teacher_model(lm_world, tmp_path):
    """The cache built, the teacher's weights deleted: the student still trains, on the cache alone."""
    from kdkit.models.causal_lm import load_causal_lm

    corpus, student_folder, teacher_src = lm_world
    teacher_folder = shutil.copytree(teacher_src, tmp_path / "teacher")
    model, teacher_tok = load_causal_lm(str(teacher_folder))
    ensemble = TeacherEnsemble([Teacher(model)])
    student_tok = load_causal_lm(str(student_folder))[1]
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True).train
    key = cross_cache_key(ensemble.fingerprint(), teacher_tok, 128, False)
    CrossTopKCache.build(tmp_path / "c", teacher_tokens(teacher_tok, data, 128), ensemble.members[0].logits, 8, 1.0,
                         key, text_fingerprint(data), log=lambda m: None)
    del model, ensemble
    for weights in teacher_folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(Exception):  # noqa: B017 - the teacher cannot be loaded any more, whatever transformers says
        load_causal_lm(str(teacher_folder))
    source = CachedCrossTeacher(CrossTopKCache.load(tmp_path / "c", key, text_fingerprint(data), 8, 1.0), data)
    import transformers

    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(student_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    loss = build_loss([("token_ce", 0.5, {}), ("hybrid_kl", 0.5, {}), ("span_likelihood", 0.2, {})])
    loss.parts[1].set_vocab_map(*shared_vocab(teacher_tok, student_tok))
    opts = TrainOptions(epochs=1, batch_size=8, lr=0.01, keep_best="loss", checkpoint_every_minutes=0)
    result = train(student, loss, data, opts, teacher=source, device="cpu", progress=False, log=lambda m: None)
    assert all(math.isfinite(v) for row in result.history for k, v in row.items() if k.startswith("train/"))
    assert any(k == "train/hybrid_kl" for row in result.history for k in row)


@pytest.mark.parametrize(
    ("losses", "match"),
    [
        ([{"name": "uld", "params": {"temperature": 2.0}}, {"name": "hybrid_kl", "params": {"temperature": 1.0}}],
         r"distill.losses: uld/hybrid_kl temperatures \[1.0, 2.0\] differ; the cache across tokenizers holds"),
        ([{"name": "uld", "params": {"temperature": {"schedule": "cosine", "start": 2.0, "end": 1.0}}}],
         r"distill.losses.1.params.temperature: scheduled; the cache across tokenizers holds the teacher at one"),
    ],
)
def test_temperatures_the_cache_cannot_hold_are_refused(lm_world, tmp_path, losses, match):
    corpus, teacher, other = lm_world
    cfg = load_config(cross_config(corpus, teacher, other, tmp_path, losses))
    with pytest.raises(ConfigError, match=match) as e:
        CausalLM().check(cfg)
    assert "\n" not in str(e.value)


def test_blocks_cut_by_text_build_one_cache_for_two_student_tokenizers(lm_world, tmp_path):
    """data.block_chars: `kdkit cache-teacher` for one student tokenizer, then a run with a wholly other student
    vocabulary trains from that cache: its blocks hold the same texts, so nothing is rebuilt."""
    from tests.conftest import bpe_tokenizer

    corpus, teacher, other = lm_world
    second = tmp_path / "second_tokenizer"
    bpe_tokenizer([p.read_text() for p in sorted(corpus.glob("*.txt"))], 240).save_pretrained(second)
    losses = [{"name": "hybrid_kl", "weight": 0.5, "params": {"temperature": 2.0}}]
    said: list[str] = []
    info = cache_teacher(cross_config(corpus, teacher, other, tmp_path, losses, data={"block_chars": 30}),
                         log=said.append)
    assert info["tokens"] > 0 and any("cut by text, 30 characters each" in s for s in said)
    said.clear()
    result = distill(cross_config(corpus, teacher, second, tmp_path, losses, data={"block_chars": 30}),
                     out=tmp_path / "run", log=said.append)
    assert any("teacher cache across tokenizers: reading" in s for s in said)
    assert not any("blocks ×" in s for s in said)  # nothing was rebuilt
    assert len(list((tmp_path / "runs" / "cache").glob("lm-cross-topk-*"))) == 1
    assert math.isfinite(result.metrics["student"]["bits_per_byte"])
