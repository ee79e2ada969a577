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
    from kdkit.validate import config_docs

    doc = ROOT / "docs" / "config.md"
    assert doc.read_text() == config_docs(), "docs/config.md is stale: run `kdkit config-docs > docs/config.md`"


def test_every_shipped_config_validates():
    """Every shipped config, of every task (interpret configs included), passes its task's checks."""
    from kdkit.tasks import load_task

    shipped = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "src" / "kdkit" / "configs").rglob("*.yaml"))
    shipped = [p for p in shipped if "accelerate" not in p.parts]  # Accelerate's launcher format, not kdkit's
    assert shipped, "no shipped configs found"
    for path in shipped:
        task, cfg = load_task(path)
        task.check(cfg)


def test_config_markdown_fills_in_registry_choices():
    # config.py imports no registry; the caller passes what a field accepts (kdkit.validate.config_docs does).
    plain = config_markdown()
    filled = config_markdown({"LossTerm.name": ["ce", "my_loss"]})
    line = next(x for x in filled.splitlines() if "A loss name registered" in x)
    assert line.endswith("One of: `ce`, `my_loss`. |")
    assert "my_loss" not in plain


def test_schedule_reachable_values_are_its_extremes():
    from kdkit.config import ScheduleSpec

    linear = ScheduleSpec(schedule="linear", start=8, end=2)
    assert [v for v, _ in linear.reachable(epochs=10)] == [8, 2]
    step = ScheduleSpec(schedule="step", start=8, gamma=0.5, every=3)
    # epochs 0-2: 8, 3-5: 4, 6-8: 2, 9: 1 → the last decay is at (1-based) epoch 10
    assert step.reachable(epochs=10) == [(8, "the start of its step schedule"), (1.0, "epoch 10 of its step schedule")]
    assert step.reachable(epochs=3) == [(8, "the start of its step schedule")]
    warm = ScheduleSpec(schedule="constant", start=4, warmup_steps=8)
    assert warm.reachable(epochs=5)[-1] == (0.5, "the first step of its warm-up")


def test_a_weight_or_schedule_must_be_finite():
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.weight: got inf; expected a finite number >= 0"):
        load_config(BASE, ["distill.losses.0.weight=.inf"])
    with pytest.raises(ConfigError, match=r"temperature\.end: Input should be a finite number"):
        load_config(BASE, ["distill.losses.1.params.temperature={schedule: linear, start: 4, end: .inf}"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"run:\n  name: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 13); expected a YAML file"),
        (b"run: \x00\x01\x02\n", "character #x0000 at position 5 is not allowed in YAML; expected a text file"),
    ],
)
def test_a_binary_config_file_is_a_config_error_naming_the_file(tmp_path, content, needle):
    p = tmp_path / "model.bin"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"config {str(p)!r}: {needle}"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("\ufeffteacher: {members: [{model: {name: mlp}}]}\nstudent: {model: {name: mlp}}\n".encode())
    assert load_config(p).student.model.name == "mlp"


def test_apply_overrides_is_public_and_leaves_the_raw_dict_alone():
    from kdkit.config import KDConfig, _set_dotted, apply_overrides, set_dotted

    raw = {**BASE}
    out = apply_overrides(raw, ["train.epochs=3", "distill.losses.1.weight=0.5"], KDConfig)
    assert out["train"]["epochs"] == 3 and out["distill"]["losses"][1]["weight"] == 0.5  # defaults resolved first
    assert raw == BASE and "train" not in raw
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}  # no root: applied as is
    tree = {"x": [{"y": 1}]}
    set_dotted(tree, "x.0.y", 5)
    _set_dotted(tree, "x.0.z", 6)  # the old name still works (kdkit.interpret.config imports it)
    assert tree == {"x": [{"y": 5, "z": 6}]}
    with pytest.raises(ConfigError, match="index 3 out of range"):
        set_dotted(tree, "x.3.y", 1)


def test_keep_best_acceptance_is_a_drafts_metric_only():
    """keep_best: acceptance reads the target's acceptance of a draft; a classifier has none: one line, named."""
    from importlib.resources import files

    from kdkit.config import load_config
    from kdkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.keep_best: 'acceptance' is a draft's metric \(data.task: causal_lm"):
        load_config(Path(str(files("kdkit") / "configs" / "demo.yaml")), ("train.keep_best=acceptance",))
