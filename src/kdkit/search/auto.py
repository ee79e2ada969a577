"""`distill.auto` (kdkit train --auto): no-regret distillation.

Before the seeds train, a small Optuna study on the validation split chooses how much to distil:

    share          the teacher losses that read logits weigh `share` of the loss and the label loss 1 − share
                   (each group keeps its configured ratios); 0 is labels alone
    temperature    one temperature for every such loss that takes one (log scale)
    feature_scale  a multiplier of the feature losses' configured weights; 0 turns them off

The config as given and labels alone (share 0, feature_scale 0: the baseline's loss) are the first two trials, so
the setting chosen (the best mean validation metric over `distill.auto.seeds`) is never worse than labels alone
on validation. Trials live in RUN_DIR/auto (auto.db, trials/, summary.json, chosen_config.yaml); a resumed run
continues the study and chooses the same way. The run then trains baseline and student with the chosen setting.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import Any

from kdkit.atomic import write_json, write_text
from kdkit.errors import ConfigError, TrainingError
from kdkit.run import RunDir

LABELS_ONLY = {"share": 0.0, "feature_scale": 0.0}


def wanted(cfg: Any) -> bool:
    """True when the config asks for it (tasks without a distill section never do)."""
    distill = getattr(cfg, "distill", None)
    return bool(distill is not None and distill.auto.enabled)


@dataclass(frozen=True)
class LossGroups:
    """Positions in distill.losses: label losses, logit teacher losses, feature losses, and the terms whose
    temperature is tuned; the configured share and temperature (the first trial)."""

    label: tuple[int, ...]
    logit: tuple[int, ...]
    feature: tuple[int, ...]
    temperature: tuple[int, ...]
    given_share: float
    given_temperature: float | None


def loss_groups(losses) -> LossGroups:
    """Sort the configured terms; one-line ConfigErrors for what auto cannot weigh."""
    from kdkit.losses import LOSSES

    label, logit, feature, temperature, temps = [], [], [], [], []
    for i, term in enumerate(losses):
        if not isinstance(term.weight, float):
            raise ConfigError(
                f"distill.losses.{i}.weight: a schedule; distill.auto chooses fixed weights (give a number)"
            )
        cls = LOSSES[term.name]
        if not cls.needs_teacher:
            label.append(i)
            continue
        (logit if cls.reads_logits else feature).append(i)
        default = inspect.signature(cls).parameters.get("temperature")
        value = term.params.get("temperature", default.default if default is not None else None)
        if cls.reads_logits and isinstance(value, (int, float)) and not isinstance(value, bool):
            temperature.append(i)
            temps.append(float(value))
    if not label:
        raise ConfigError(
            "distill.losses: distill.auto weighs the teacher against a label loss (ce for classifiers, token_ce "
            "for language models); add one"
        )
    if not logit and not feature:
        raise ConfigError("distill.losses: no teacher loss for distill.auto to weigh; add soft_kl, token_kl or one")
    label_sum = sum(losses[i].weight for i in label)
    logit_sum = sum(losses[i].weight for i in logit)
    share = logit_sum / (label_sum + logit_sum) if logit and label_sum + logit_sum > 0 else 0.0
    return LossGroups(tuple(label), tuple(logit), tuple(feature), tuple(temperature), share,
                      temps[0] if temps else None)


def setting_overrides(groups: LossGroups, losses, setting: dict) -> list[str]:
    """The `--set` overrides of one setting {share, temperature, feature_scale} (missing keys: as configured)."""
    out = []
    if groups.logit and "share" in setting:
        share = float(setting["share"])
        label_sum = sum(losses[i].weight for i in groups.label)
        logit_sum = sum(losses[i].weight for i in groups.logit)
        for i in groups.label:
            weight = _ratio(losses[i].weight, label_sum, len(groups.label)) * (1 - share)
            out.append(f"distill.losses.{i}.weight={json.dumps(weight)}")
        for i in groups.logit:
            weight = _ratio(losses[i].weight, logit_sum, len(groups.logit)) * share
            out.append(f"distill.losses.{i}.weight={json.dumps(weight)}")
    if "feature_scale" in setting:
        for i in groups.feature:
            out.append(f"distill.losses.{i}.weight={json.dumps(losses[i].weight * float(setting['feature_scale']))}")
    if "temperature" in setting and setting["temperature"] is not None:
        for i in groups.temperature:
            out.append(f"distill.losses.{i}.params.temperature={json.dumps(float(setting['temperature']))}")
    return out


def _ratio(weight: float, total: float, count: int) -> float:
    """This term's part of its group: its weight over the group's sum (equal parts when all weigh 0)."""
    return weight / total if total > 0 else 1.0 / count


def candidates(groups: LossGroups, auto) -> dict[str, list[float] | tuple[float, float]]:
    """What a trial may choose: shares and feature scales (0 and the configured value always among them) and the
    temperature range (widened to hold the configured temperature)."""
    space: dict[str, Any] = {}
    if groups.logit:
        space["share"] = sorted({0.0, round(groups.given_share, 6), *map(float, auto.shares)})
        if groups.temperature:
            low, high = auto.temperature
            given = groups.given_temperature
            space["temperature"] = (min(low, given), max(high, given))
    if groups.feature:
        space["feature_scale"] = sorted({0.0, 1.0, *map(float, auto.feature_scales)})
    return space


def given_setting(groups: LossGroups, space: dict) -> dict:
    setting: dict[str, float] = {}
    if "share" in space:
        setting["share"] = round(groups.given_share, 6)
    if "temperature" in space:
        setting["temperature"] = groups.given_temperature
    if "feature_scale" in space:
        setting["feature_scale"] = 1.0
    return setting


def labels_only_setting(groups: LossGroups, space: dict) -> dict:
    setting = {k: v for k, v in LABELS_ONLY.items() if k in space}
    if "temperature" in space:
        setting["temperature"] = groups.given_temperature  # unused at share 0; fixed so the trial is the same
    return setting


def choose(task, config, overrides: tuple[str, ...], cfg, data, teacher, run: RunDir) -> tuple[Any, dict]:
    """Run (or continue) the study in RUN_DIR/auto; return the config with the chosen setting and its record."""
    from kdkit.search.study import finished, open_study
    from kdkit.search.tune import trial_objective

    auto = cfg.distill.auto
    metric = auto.metric or task.search_metrics[0]
    if metric not in task.search_metrics:
        expected = ", ".join(task.search_metrics)
        raise ConfigError(f"distill.auto.metric: {metric!r} for a {task.name} run; expected one of: {expected}")
    if getattr(data, "val", None) is None:
        raise ConfigError("data.val_fraction: distill.auto chooses on the validation split; set it above 0")
    direction = "minimize" if metric == "loss" else "maximize"
    seeds = list(auto.seeds or cfg.run.seeds[:1])
    losses = cfg.distill.losses
    groups = loss_groups(losses)
    space = candidates(groups, auto)
    auto_run = dataclasses.replace(run, path=run.path / "auto")
    study = open_study(auto_run.path / "auto.db", "auto", direction, 0, "median")
    if not study.trials:
        study.enqueue_trial(given_setting(groups, space))
        study.enqueue_trial(labels_only_setting(groups, space))

    def suggest(trial) -> list[str]:
        setting = {}
        for name, values in space.items():
            if name == "temperature":
                setting[name] = trial.suggest_float(name, values[0], values[1], log=True)
            else:
                setting[name] = trial.suggest_categorical(name, values)
        return setting_overrides(groups, losses, setting)

    objective = trial_objective(task, config, overrides, suggest, data, teacher, auto_run, metric, direction, seeds)
    remaining = max(0, auto.trials - finished(study))
    run.log(f"auto: choosing the distillation setting on validation {metric} ({auto.trials} trials, seeds {seeds}; "
            f"{remaining} to go)")
    study.optimize(objective, n_trials=remaining, catch=(TrainingError,))
    record = summary(study, groups, space, metric, direction, seeds)
    chosen = record["chosen"]
    chosen_overrides = setting_overrides(groups, losses, chosen)
    record["overrides"] = chosen_overrides
    chosen_cfg = task.load_config(config, (*overrides, *chosen_overrides))
    if run.is_main:
        write_json(auto_run.path / "summary.json", record)
        write_text(auto_run.path / "chosen_config.yaml", task.dump_config(chosen_cfg))
    run.log(auto_line(record))
    return chosen_cfg, record


def summary(study, groups: LossGroups, space: dict, metric: str, direction: str, seeds: list[int]) -> dict:
    """metrics.json's `auto`: every trial (setting, state, value), the chosen setting, labels alone and the config
    as given (trials 0 and 1), and whether the chosen setting distils at all."""
    import optuna

    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            **{name: t.params.get(name) for name in space},
            "per_seed": t.user_attrs.get("per_seed_best"),
        })
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise TrainingError("distill.auto: no trial completed; see the log of RUN_DIR/auto")
    sign = 1 if direction == "maximize" else -1
    best = max(complete, key=lambda t: (sign * t.value, -t.number))  # the earlier trial wins a tie
    by_number = {t["number"]: t for t in trials}
    chosen = {name: best.params.get(name) for name in space}
    distils = bool(chosen.get("share", 0.0) > 0 or chosen.get("feature_scale", 0.0) > 0)
    return {
        "metric": metric,
        "direction": direction,
        "seeds": seeds,
        "trials": trials,
        "chosen": {**chosen, "value": best.value, "number": best.number},
        "given": by_number.get(0, {}).get("value"),
        "labels_only": by_number.get(1, {}).get("value"),
        "distils": distils,
    }


def auto_line(record: dict) -> str:
    """One line for the log and the CLI: what was chosen against labels alone, on validation."""
    chosen = record["chosen"]
    parts = [f"{name} {_fmt(chosen[name])}" for name in ("share", "temperature", "feature_scale") if name in chosen]
    what = ", ".join(parts) + (" (labels alone)" if not record["distils"] else "")
    metric = record["metric"]
    vs = f"labels alone {_fmt(record['labels_only'])}" if record.get("labels_only") is not None else "labels alone —"
    return (f"auto: chose {what}: validation {metric} {_fmt(chosen['value'])} vs {vs} "
            f"({len(record['trials'])} trials, seeds {record['seeds']})")


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"
