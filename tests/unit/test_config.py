"""Config: typed sections, dotted overrides, unknown keys with suggestions, every error at once, docs fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdkit.config import config_diff, config_markdown, dump_config, load_config, parse_override
from kdkit.errors import ConfigError

BASE = {"teacher": {"members": [{"model": {"name": "small_cnn"}}]}, "student": {"model": {"name": "mlp"}}}
ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides():
    cfg = load_config(BASE, ["train.epochs=3", "distill.losses.1.params.temperature=2", "run.seeds=[1, 2]"])
    assert cfg.train.epochs == 3 and cfg.run.seeds == [1, 2]
    assert cfg.distill.losses[1].params == {"temperature": 2}
    assert cfg.distill.losses[0].name == "ce" and cfg.distill.losses[0].weight == 0.1


def test_config_is_frozen():
    cfg = load_config(BASE)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 5


def test_unknown_keys_suggest_and_all_errors_come_at_once():
    raw = {**BASE, "trian": {}, "train": {"epoch": 3, "lr": "fast"}}
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    details = "\n".join(info.value.details)
    assert "3 problems" in str(info.value)
    assert "trian: unknown key (did you mean: train" in details
    assert "train.epoch: unknown key (did you mean: epochs?)" in details
    assert "train.lr: got 'fast'" in details


def test_nested_list_paths_are_named():
    raw = {**BASE, "teacher": {"members": [{"model": {"name": "mlp", "kwarg": {}}}]}}
    with pytest.raises(ConfigError, match=r"teacher\.members\.0\.model\.kwarg: unknown key \(did you mean: kwargs"):
        load_config(raw)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match=r"train\.epochs: got -1"):
        load_config(BASE, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match=r"index 5 out of range"):
        load_config(BASE, ["distill.losses.5.weight=1"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        load_config(BASE, ["data.val_fraction=0.5", "data.test_fraction=0.45"])
    with pytest.raises(ConfigError, match="loss listed twice: ce"):
        load_config({**BASE, "distill": {"losses": [{"name": "ce"}, {"name": "ce"}]}})
    with pytest.raises(ConfigError, match="needs `path`"):
        load_config(BASE, ["data.source=csv"])


def test_yaml_errors_give_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\n  seeds: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(p)


def test_dump_round_trips_and_diff_names_keys(tmp_path):
    cfg = load_config(BASE, ["train.epochs=4"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert config_diff(cfg, load_config(BASE, ["train.epochs=5", "train.lr=0.1"])) == ["train.epochs", "train.lr"]


def test_docs_config_md_is_fresh():
    doc = ROOT / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "docs/config.md is stale: run `kdkit config-docs > docs/config.md`"


def test_every_shipped_config_validates():
    from kdkit.validate import check_names

    shipped = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "src" / "kdkit" / "configs").glob("*.yaml"))
    assert shipped, "no shipped configs found"
    for path in shipped:
        check_names(load_config(path))
