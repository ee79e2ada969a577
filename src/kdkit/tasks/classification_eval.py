"""The classification task's evaluation and report: test-split quality of teacher, baseline and student seeds,
robustness, and the cost of each model measured the same way (kdkit.evaluate.cost)."""

from __future__ import annotations

import copy

from kdkit.config import KDConfig
from kdkit.data import DataBundle
from kdkit.errors import ConfigError
from kdkit.evaluate.cost import measure_cost
from kdkit.evaluate.predict import predict
from kdkit.evaluate.schema import assemble
from kdkit.registry import lookup
from kdkit.report.table import CLASSIFICATION_COLUMNS
from kdkit.run.disk import append_disk_section
from kdkit.run.phases import KINDS
from kdkit.run.teacher import frozen
from kdkit.teachers import TeacherEnsemble

COLUMNS = CLASSIFICATION_COLUMNS
GAIN_KEYS = ("accuracy", "f1_macro", "ece")


def evaluate(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, results: dict, device: str, best: dict,
             info: dict):
    """(metrics.json, extras for the report): quality per seed, cost, robustness, on the test split. info: the
    recipe's own figures (the teacher cache's size), kept in metrics.json."""
    from kdkit.evaluate.metrics import classification_metrics, confusion, reliability  # scikit-learn: when used
    e = cfg.eval
    t_logits, labels = predict(teacher, data.test, e.batch_size, device)
    teacher_m = classification_metrics(t_logits, labels, t_logits, e.ece_bins)
    per_seed, curves, best_logits = {}, {"teacher": reliability(t_logits, labels, e.ece_bins)}, None
    for kind, key in KINDS:
        rows = []
        for r in results[kind]:
            logits, _ = predict(r.model.to(device).eval(), data.test, e.batch_size, device)
            rows.append(classification_metrics(logits, labels, t_logits, e.ece_bins))
            r.model.cpu()
            if r.phase.name == best["phase"]:
                best_logits = logits
            curves[key] = reliability(logits, labels, e.ece_bins)
        if rows:
            per_seed[key] = rows
    cost = costs(cfg, data, teacher, results, device)
    extras = {**info, **robustness_of(cfg, data, teacher, results, labels, device)}
    if data.modality == "text":
        extras["data"] = {"max_length": data.input_shape[0], "truncated_texts": data.truncated}
    seeds = [r.phase.seed for r in results["student"]]
    metrics = assemble("classification", seeds, teacher_m, per_seed["student"], per_seed.get("baseline_student"),
                       cost, GAIN_KEYS, best, **extras)
    report_extras = {
        "confusion_matrix": confusion(best_logits, labels, data.num_classes),
        "reliability_curves": curves,
        "robustness": metrics.get("robustness"),
        "class_names": data.class_names,
    }
    return metrics, report_extras


def quiet(message: str) -> None:
    """The student's fold is checked like the teacher's, without a second report of it."""


def costs(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, results: dict, device: str) -> dict:
    """Teacher and students timed the same way: each behind the same frozen wrapper (precision, memory format,
    BN folding as the run's teacher), batch 1 for latency and the eval batch for throughput."""
    e = cfg.eval
    one, batch = data.example(1).to(device), data.example(e.batch_size).to(device)

    def measure(forward, modules) -> dict:
        return measure_cost(forward, modules, one, batch, repeats=e.latency_repeats, warmup=e.latency_warmup)

    out = {"teacher": measure(teacher, [m.model for m in teacher.members])}
    for kind, key in KINDS:
        if results[kind]:  # the seeds share one architecture: one measurement
            model = results[kind][0].model
            out[key] = measure(frozen(copy.deepcopy(model), cfg.distill, batch[:8], device, quiet), [model])
    return out  # speed-ups: one definition, added by assemble


def robustness_of(cfg: KDConfig, data: DataBundle, teacher, results: dict, labels, device: str) -> dict:
    """Accuracy under input corruptions (eval.robustness), for the teacher and every seed of each student."""
    e = cfg.eval
    if not e.robustness:
        return {}
    from kdkit.evaluate.robustness import CORRUPTIONS, default_corruptions, robustness
    models = {"teacher": [teacher]}
    models.update({key: [r.model.to(device) for r in results[kind]] for kind, key in KINDS if results[kind]})
    inputs, _ = data.inputs("test")
    text = data.modality == "text"
    options = {"mask_id": data.test.mask_id or 0, "pad_id": data.test.pad_id} if text else {}
    corruptions = list(e.corruptions.items()) if e.corruptions else default_corruptions(data.input_shape, text)
    for name, _ in corruptions:
        lookup(CORRUPTIONS, name, "eval.corruptions")
    try:
        figures = robustness(models, inputs, labels, corruptions, seed=cfg.data.split_seed, batch_size=e.batch_size,
                             device=device, **options)
    except ValueError as exc:
        raise ConfigError(f"eval.corruptions: {exc}") from None
    finally:
        for kind, _ in KINDS:
            for r in results[kind]:
                r.model.cpu()
    return {"robustness": figures}


def report(cfg: KDConfig, run, metrics: dict, histories: dict, recipe, extras: dict) -> None:
    from kdkit.config import dump_config
    from kdkit.report.markdown import write_report  # matplotlib: when a report is written

    write_report(
        run.path, metrics=metrics, histories=histories, formula=recipe.formula, config_yaml=dump_config(cfg),
        env=run.env, **extras,
    )
    append_disk_section(run.path)
