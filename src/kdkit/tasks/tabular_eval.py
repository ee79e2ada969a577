"""The tabular task's evaluation and report: the seeds' figures gathered from the phases (each phase measured its
student on its seed's test rows when it was fit), the cost of teacher and students measured the same way as for
every task (kdkit.evaluate.cost), and metrics.json in the one schema (kdkit.evaluate.schema); with student.auto,
its `student_auto` entry gathers the seeds' choices (kdkit.interpret.auto.summarise)."""

from __future__ import annotations

import json
import math

import numpy as np

from kdkit.errors import TrainingError
from kdkit.evaluate.cost import measure_cost
from kdkit.evaluate.schema import assemble, mean_of
from kdkit.interpret.auto import auto_line, summarise
from kdkit.interpret.fidelity import fidelity, quality
from kdkit.interpret.predict import FittedStudent, load_student_folder
from kdkit.interpret.report import write_interpret_report
from kdkit.interpret.students import student_settings
from kdkit.run import PhaseResult, RunDir
from kdkit.run.disk import append_disk_section
from kdkit.run.phases import KINDS

GAIN_KEYS = ("accuracy", "f1_macro", "fidelity_test", "fidelity_neighbourhood")


def evaluate(cfg, data, teachers, results: dict[str, list[PhaseResult]], run: RunDir, best: dict):
    """(metrics.json, extras for the report) of the phases in `results`, as every task: a run's seeds, or the kept
    student alone when a finished run is evaluated again (kdkit eval), measured again with its seed's teacher,
    fit again identically."""
    seeds = [r.phase.seed for r in results["student"]]

    def summary(kind: str, seed: int) -> dict:
        done = next((r for r in results.get(kind, []) if r.phase.seed == seed), None)
        if done is not None and "test" in done.summary:
            return done.summary
        path = run.phase_dir(f"{kind}-s{seed}") / "result.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if done is None:
            if saved is None:
                raise TrainingError(f"RUN_DIR: {path.parent} holds no finished {kind}-s{seed}; did the run finish?")
            return saved
        fresh = measure(done.model, teachers(seed), data.class_names, math.nan)
        if saved is not None:
            fresh["test"]["seconds"] = saved["test"]["seconds"]  # fitting time: the run's, not measured here
            if "auto" in saved:  # student.auto's choice, made when the phase was fit
                fresh["auto"] = saved["auto"]
        else:
            del fresh["test"]["seconds"]
        return fresh

    summaries = {kind: [summary(kind, r.phase.seed) for r in results[kind]] for kind, _ in KINDS}
    kept_seed = best["seed"]
    kept = model_of(results, "student", kept_seed, run)
    baseline = model_of(results, "baseline", kept_seed, run) if results["baseline"] else None
    kept_summary = summaries["student"][seeds.index(kept_seed)]
    per_class = {where: pool_per_class([s["per_class"][where] for s in summaries["student"]])
                 for where in ("test", "neighbourhood")}
    student_figures = [s["test"] for s in summaries["student"]]
    warnings = low_fidelity(student_figures, cfg.report.low_fidelity)
    for warning in warnings:
        run.log(f"warning: {warning}")
    encoder = kept.encoder
    records = [s.get("auto") for s in summaries["student"]]
    auto = {"student_auto": summarise(records, seeds)} if records and all(records) else {}
    if auto:
        run.log(auto_line(auto["student_auto"]))
    metrics = assemble(
        "tabular", seeds, [s["teacher"] for s in summaries["student"]], student_figures,
        [s["test"] for s in summaries["baseline"]] or None, costs(cfg, teachers(kept_seed), kept, baseline),
        GAIN_KEYS,
        best,  # the first seed: no validation score chose it (by says so)
        data={
            "rows": len(data.frame),
            "dropped_rows_without_target": data.dropped,
            "train_rows": kept_summary["train_rows"],
            "test_rows": kept_summary["test_rows"],
            "numeric": data.numeric,
            "categorical": data.categorical,
            "encoded_features": len(encoder.feature_names),
            "classes": data.class_names,
        },
        teacher_members=len(cfg.teacher.members),
        teacher_kinds=[m.kind for m in cfg.teacher.members],
        student_model={"kind": cfg.student.kind, "settings": student_settings(cfg.student)},
        per_class=per_class,
        low_fidelity=warnings,
        **auto,
    )
    return metrics, {"kept": kept, "x_train": train_matrix(data, kept)}


def measure(model: FittedStudent, s, class_names: list[str], seconds: float) -> dict:
    """A phase's result.json: the student's figures on its seed's test rows ("test": accuracy, macro F1, log loss,
    fidelity on the test rows and on the evaluation neighbourhood, size, fitting seconds), per class of the
    teacher, and the teacher's own figures on the same rows."""
    s_te, s_ev = model.proba_codes(s.num_te, s.cat_te), model.proba_codes(s.ev_num, s.ev_cat)
    fid_te = fidelity(s.t_te.argmax(1), s_te.argmax(1), class_names)
    fid_ev = fidelity(s.t_ev.argmax(1), s_ev.argmax(1), class_names)
    figures = {
        **quality(s_te, s.y_te),
        "fidelity_test": fid_te["agreement"],
        "fidelity_neighbourhood": fid_ev["agreement"],
        **model.student.size(),
        "seconds": seconds,
    }
    return {
        "history": [],
        "test": figures,
        "per_class": {"test": fid_te["per_class"], "neighbourhood": fid_ev["per_class"]},
        "teacher": s.figures,
        "train_rows": len(s.y_tr),
        "test_rows": len(s.y_te),
    }


def train_matrix(data, model: FittedStudent) -> np.ndarray:
    """The encoded training rows of the model's seed (the rules count them)."""
    train, _ = data.split(model.seed)
    return model.encoder.transform(data.frame.iloc[train])


def model_of(results: dict, kind: str, seed: int, run: RunDir) -> FittedStudent:
    """The seed's model of that kind: trained (or reused) by this run, or read from its phase folder."""
    done = next((r for r in results.get(kind, []) if r.phase.seed == seed), None)
    if done is not None:
        return done.model
    return load_student_folder(run.phase_dir(f"{kind}-s{seed}"))


def costs(cfg, s, kept: FittedStudent, baseline: FittedStudent | None) -> dict:
    """Teacher and students of the kept seed timed the same way, from the same input: rows as codes (numbers, then
    category codes), so that each pays for its own encoding as when it predicts a table. Latency: one test row;
    throughput: eval.batch_size test rows (repeated when the test split is smaller)."""
    e = cfg.eval
    p = s.num_te.shape[1]
    codes = np.hstack([s.num_te, s.cat_te.astype(np.float64)])
    one, batch = codes[:1], codes[np.arange(e.batch_size) % len(codes)]

    def split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a[:, :p], a[:, p:].astype(np.int64)

    def cost(forward, size: dict) -> dict:
        return measure_cost(forward, size, one, batch, repeats=e.latency_repeats, warmup=e.latency_warmup)

    out = {"teacher": cost(lambda a: s.teacher.proba(*split(a)), s.teacher.footprint())}
    if baseline is not None:
        out["baseline_student"] = cost(lambda a: baseline.proba_codes(*split(a)), baseline.student.footprint())
    out["student"] = cost(lambda a: kept.proba_codes(*split(a)), kept.student.footprint())
    return out


def pool_per_class(per_seed: list[dict]) -> dict:
    """Per class: points the teacher put there and the share the student agreed on, pooled over seeds."""
    out = {}
    for name in per_seed[0]:
        n = sum(row[name]["n"] for row in per_seed)
        agreed = sum(row[name]["n"] * row[name]["agreement"] for row in per_seed if row[name]["n"])
        out[name] = {"n": n, "agreement": agreed / n if n else math.nan}
    return out


def low_fidelity(per_seed: list[dict], threshold: float) -> list[str]:
    """Plain warnings when the mean fidelity over seeds is below the threshold (report.low_fidelity)."""
    warnings = []
    for key, where in (("fidelity_test", "the test rows"), ("fidelity_neighbourhood", "points around the test rows")):
        value = float(np.mean([f[key] for f in per_seed]))
        if value < threshold:
            warnings.append(
                f"fidelity on {where} is {100 * value:.1f}% (< {100 * threshold:.0f}%): the student does not explain "
                "the teacher there; do not read its rules as the teacher's reasoning"
            )
    return warnings


def report(cfg, run: RunDir, metrics: dict, extras: dict) -> None:
    write_interpret_report(run.path, cfg=cfg, metrics=metrics, kept=extras["kept"], x_train=extras["x_train"],
                           env=run.env)
    append_disk_section(run.path)
    run.log(f"fidelity on test {100 * mean_of(metrics['student']['fidelity_test']):.2f}% "
            f"(report: {run.path / 'report.md'})")
