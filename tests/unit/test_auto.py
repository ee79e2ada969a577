"""distill.auto (no-regret distillation): the settings' arithmetic by hand, labels alone equal to the baseline,
the choice never below labels alone on validation, resume, the report, and one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest

from kdkit.config import load_config
from kdkit.errors import ConfigError
from kdkit.pipeline import distill
from kdkit.report.auto import reason, verdict
from kdkit.search.auto import (
    auto_line,
    candidates,
    given_setting,
    labels_only_setting,
    loss_groups,
    setting_overrides,
)

TINY = {
    "run": {"name": "auto", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}], "train": {"epochs": 2}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"cache_teacher": True, "auto": {"enabled": True, "trials": 3}},
    "train": {"epochs": 2},
    "eval": {"robustness": False, "latency_repeats": 2, "latency_warmup": 0},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))


def losses_of(terms: list[dict]):
    return load_config({**TINY, "distill": {"losses": terms}}).distill.losses


def as_dict(overrides: list[str]) -> dict:
    return {k: json.loads(v) for k, v in (o.split("=", 1) for o in overrides)}


def test_settings_are_hand_checked_weights():
    soft = {"name": "soft_kl", "weight": 0.9, "params": {"temperature": 4}}
    losses = losses_of([{"name": "ce", "weight": 0.1}, soft])
    groups = loss_groups(losses)
    assert (groups.label, groups.logit, groups.feature, groups.temperature) == ((0,), (1,), (), (1,))
    assert groups.given_share == pytest.approx(0.9) and groups.given_temperature == 4.0
    half = as_dict(setting_overrides(groups, losses, {"share": 0.5, "temperature": 2.0}))
    assert half == {"distill.losses.0.weight": 0.5, "distill.losses.1.weight": 0.5,
                    "distill.losses.1.params.temperature": 2.0}
    space = candidates(groups, load_config(TINY).distill.auto)
    assert space["share"] == [0.0, 0.25, 0.5, 0.75, 0.9]  # 0 and the configured 0.9 are always there
    assert space["temperature"] == (1.0, 8.0)
    alone = as_dict(setting_overrides(groups, losses, labels_only_setting(groups, space)))
    assert alone["distill.losses.0.weight"] == 1.0 and alone["distill.losses.1.weight"] == 0.0  # the baseline's loss
    given = as_dict(setting_overrides(groups, losses, given_setting(groups, space)))
    assert given["distill.losses.0.weight"] == pytest.approx(0.1) and given["distill.losses.1.weight"] == 0.9


def test_groups_keep_ratios_and_scale_feature_losses():
    # Two label-free teacher terms 1:3 and a feature loss: share 0.4 splits 0.1 / 0.3, the label loss gets 0.6.
    losses = losses_of([
        {"name": "ce", "weight": 2.0},
        {"name": "soft_kl", "weight": 1.0},
        {"name": "dkd", "weight": 3.0},
        {"name": "attention_transfer", "weight": 50.0, "params": {"pairs": [["a", "b"]]}},
    ])
    groups = loss_groups(losses)
    assert groups.logit == (1, 2) and groups.feature == (3,)
    assert groups.given_share == pytest.approx(4 / 6)
    got = as_dict(setting_overrides(groups, losses, {"share": 0.4, "feature_scale": 0.1}))
    assert got["distill.losses.0.weight"] == pytest.approx(0.6)
    assert got["distill.losses.1.weight"] == pytest.approx(0.1) and got["distill.losses.2.weight"] == pytest.approx(0.3)
    assert got["distill.losses.3.weight"] == pytest.approx(5.0)
    assert 0.0 in candidates(groups, load_config(TINY).distill.auto)["feature_scale"]


def test_what_auto_cannot_weigh_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"distill.losses: distill.auto weighs the teacher against a label loss"):
        loss_groups(losses_of([{"name": "soft_kl", "weight": 1.0}]))
    scheduled = {"name": "soft_kl", "weight": {"schedule": "linear", "start": 0.0, "end": 1.0}}
    with pytest.raises(ConfigError, match=r"distill.losses.1.weight: a schedule; distill.auto chooses fixed weights"):
        loss_groups(losses_of([{"name": "ce"}, scheduled]))
    with pytest.raises(ConfigError, match=r"distill.auto: chooses on the validation split, but data.val_fraction is 0"):
        load_config({**TINY, "data": {**TINY["data"], "val_fraction": 0.0}})
    with pytest.raises(ConfigError, match=r"distill.auto.trials: .*greater than or equal to 2"):
        load_config({**TINY, "distill": {"auto": {"enabled": True, "trials": 1}}})


def test_auto_run_chooses_on_validation_never_below_labels_alone_and_resumes(tmp_path):
    out = tmp_path / "run"
    result = distill(copy.deepcopy(TINY), out=out, log=lambda m: None)
    record = result.metrics["auto"]
    trials = {t["number"]: t for t in record["trials"]}
    assert len(trials) == 3 and trials[1]["share"] == 0.0 and trials[0]["share"] == pytest.approx(0.9)
    assert record["chosen"]["value"] >= record["labels_only"] == trials[1]["value"]
    assert record["chosen"]["value"] == max(t["value"] for t in trials.values() if t["state"] == "COMPLETE")
    # Labels alone inside auto is the baseline: same seed, same loss gradient (1·ce + 0·soft_kl), same curve.
    history = json.loads((out / "history.json").read_text())
    baseline_best = max(h["val/accuracy"] for h in history["baseline-s0"] if "val/accuracy" in h)
    assert trials[1]["per_seed"] == [pytest.approx(baseline_best, abs=1e-12)]
    chosen = load_config(out / "auto" / "chosen_config.yaml")
    assert chosen.distill.losses[1].weight == pytest.approx(record["chosen"]["share"])
    report = (out / "report.md").read_text()
    assert "## Automatic distillation setting (distill.auto)" in report and "(labels alone)" in report
    assert "**(chosen)**" in report
    assert auto_line(record).startswith("auto: chose share ")
    # Resumed: the study is complete, nothing is tried again, the same setting is chosen.
    logs: list[str] = []
    again = distill(copy.deepcopy(TINY), out=out, resume=True, log=logs.append)
    assert any("(3 trials, seeds [0]; 0 to go)" in line for line in logs)
    assert again.metrics["auto"]["chosen"] == record["chosen"]


def metrics_with(distils: bool, teacher: float, baseline: float) -> dict:
    record = {"distils": distils, "chosen": {"value": 0.9}, "labels_only": 0.88}
    return {"auto": record, "teacher": {"accuracy": teacher}, "baseline_student": {"accuracy": baseline}}


def test_the_verdict_names_a_reason_from_the_run_figures():
    assert "data saturates: the student on labels alone reaches 99.50%" in reason(metrics_with(False, 0.999, 0.995))
    assert "teacher is not better" in reason(metrics_with(False, 0.955, 0.950))
    assert "student may be too small" in reason(metrics_with(False, 0.97, 0.90))
    assert verdict(metrics_with(True, 0.97, 0.90)).startswith("Distillation paid on validation: 0.9 against 0.88")
    assert verdict(metrics_with(False, 0.97, 0.90)).startswith("Distillation did not pay on validation")
