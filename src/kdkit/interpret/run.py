"""`kdkit interpret`: a teacher on a table → an interpretable student, with its fidelity, read top to bottom.

Per seed: split the rows, fit the encoder on the training rows, train (or load) the teacher, draw synthetic points
around the training rows, label real and synthetic points with the teacher, fit the student on those soft labels,
fit the same student on the real labels alone, and measure both against the labels and against the teacher on the
test rows and on synthetic points around the test rows. The first seed's encoder and student are saved.

The run directory:
  config.yaml     the resolved config            encoder.json   the fitted encoding (prediction repeats it)
  env.json        versions, seeds, timings       student.json   the student, readable without pickle
  metrics.json    all figures, mean ± std        label_student.json  the same student fit on labels alone
  rules.txt       the tree as rules / the non-zero coefficients
  report.md       the report, with plots/ (tree.png, importance.png, fidelity.png, accuracy.png)
  student.skops, teacher/member_<i>.skops   when skops is installed (scikit-learn objects, safe to load)
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdkit.atomic import write_json, write_text
from kdkit.interpret.config import InterpretConfig, dump_interpret_config, load_interpret_config
from kdkit.interpret.fidelity import fidelity, mean_std, quality
from kdkit.interpret.neighbourhood import sample_codes
from kdkit.interpret.report import write_interpret_report
from kdkit.interpret.students import build_student, rules_text, tree_rules
from kdkit.interpret.tabular import TabularEncoder, encode_target, load_frame, select_columns, split_rows
from kdkit.interpret.teachers import TRAINED, build_teacher, check_teacher, have_skops, save_skops

Log = Callable[[str], None]
EVAL_SEED_OFFSET = 1_000_003  # the evaluation neighbourhood's random stream, apart from the fitting one's


def interpret_run(
    config_or_path: InterpretConfig | str | Path | dict,
    out: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    log: Log = print,
) -> dict:
    """Run the whole job; return metrics.json's content with "run_dir" added."""
    started = time.perf_counter()
    if isinstance(config_or_path, InterpretConfig):
        cfg = config_or_path
        if overrides:
            cfg = load_interpret_config(cfg.model_dump(mode="json"), overrides)
    else:
        cfg = load_interpret_config(config_or_path, overrides)
    check_teacher(cfg.teacher)
    run_dir = Path(out) if out is not None else Path(cfg.run.out_dir) / cfg.run.name

    frame = load_frame(cfg.data)
    features, numeric, categorical = select_columns(frame, cfg.data)
    y_all, class_names, keep = encode_target(frame, cfg.data.target)
    dropped = int((~keep).sum())
    frame = frame[keep].reset_index(drop=True)
    log(
        f"data: {len(frame)} rows, {len(numeric)} numeric + {len(categorical)} categorical features, "
        f"{len(class_names)} classes" + (f" ({dropped} rows without a target dropped)" if dropped else "")
    )
    kinds = "+".join(m.kind for m in cfg.teacher.members)
    s = cfg.student
    log(f"teacher: {kinds} → student: {s.kind} ({_student_settings(cfg)}); {cfg.neighbourhood.points} synthetic points")

    per_seed, per_class, saved = [], {"test": [], "neighbourhood": []}, None
    for seed in cfg.run.seeds:
        result = _one_seed(cfg, frame, y_all, class_names, numeric, categorical, seed)
        per_seed.append(result["figures"])
        per_class["test"].append(result["per_class_test"])
        per_class["neighbourhood"].append(result["per_class_neighbourhood"])
        f = result["figures"]
        log(
            f"seed {seed}: teacher {100 * f['teacher_accuracy']:.2f}% | student {100 * f['student_accuracy']:.2f}% "
            f"(labels only {100 * f['label_student_accuracy']:.2f}%) | fidelity test "
            f"{100 * f['fidelity_test']:.2f}%, neighbourhood {100 * f['fidelity_neighbourhood']:.2f}%"
        )
        if saved is None:
            saved = result

    summary = mean_std(per_seed)
    metrics = {
        "kind": "interpret",
        "data": {
            "rows": len(frame),
            "dropped_rows_without_target": dropped,
            "train_rows": saved["train_rows"],
            "test_rows": saved["test_rows"],
            "numeric": numeric,
            "categorical": categorical,
            "encoded_features": len(saved["encoder"].feature_names),
            "classes": class_names,
        },
        "teacher": {"members": [m.kind for m in cfg.teacher.members]},
        "student": {"kind": s.kind, "settings": _student_settings(cfg), "saved_seed": cfg.run.seeds[0]},
        "seeds": list(cfg.run.seeds),
        "summary": summary,
        "per_class": {where: _pool_per_class(rows) for where, rows in per_class.items()},
        "low_fidelity": _low_fidelity(summary, cfg.report.low_fidelity),
        "seconds": time.perf_counter() - started,
    }
    _write_run(run_dir, cfg, metrics, saved, log)
    metrics["seconds"] = time.perf_counter() - started
    write_json(run_dir / "metrics.json", metrics)
    for warning in metrics["low_fidelity"]:
        log(f"warning: {warning}")
    return {**metrics, "run_dir": str(run_dir)}


def _one_seed(cfg: InterpretConfig, frame, y_all, class_names, numeric, categorical, seed: int) -> dict:
    d, nb = cfg.data, cfg.neighbourhood
    split_seed = d.split_seed + (seed if d.resplit_each_seed else 0)
    train_idx, test_idx = split_rows(y_all, d.test_fraction, split_seed, d.limit)
    train_frame, test_frame = frame.iloc[train_idx], frame.iloc[test_idx]
    encoder = TabularEncoder.fit(
        train_frame, d.target, class_names, numeric, categorical, d.encoding, d.impute, d.unseen_category, d.max_levels
    )
    num_tr, cat_tr = encoder.codes(train_frame)
    num_te, cat_te = encoder.codes(test_frame)
    y_tr, y_te = y_all[train_idx], y_all[test_idx]

    t0 = time.perf_counter()
    teacher, trained = build_teacher(cfg.teacher, encoder, seed)
    teacher.fit(num_tr, cat_tr, y_tr, trained)
    teacher_seconds = time.perf_counter() - t0

    # The transfer set: the real training rows plus synthetic points around them, all labelled by the teacher.
    syn_num, syn_cat = sample_codes(encoder, num_tr, cat_tr, nb.points, nb.method, nb.scale, nb.category_resample, seed)
    fit_num, fit_cat = np.vstack([num_tr, syn_num]), np.vstack([cat_tr, syn_cat])
    t0 = time.perf_counter()
    soft = teacher.proba(fit_num, fit_cat)
    x_fit, x_tr = encoder.matrix(fit_num, fit_cat), encoder.matrix(num_tr, cat_tr)
    n_classes = len(class_names)
    student = build_student(cfg.student, n_classes, seed).fit_teacher(x_fit, soft)
    student_seconds = time.perf_counter() - t0
    label_student = build_student(cfg.student, n_classes, seed).fit_labels(x_tr, y_tr)

    # Fidelity off the data: synthetic points around the test rows (another random stream), never fit on.
    ev_num, ev_cat = sample_codes(
        encoder, num_te, cat_te, nb.eval_points, "perturb", nb.scale, nb.category_resample, seed + EVAL_SEED_OFFSET
    )
    x_te, x_ev = encoder.matrix(num_te, cat_te), encoder.matrix(ev_num, ev_cat)
    t_te, t_ev = teacher.proba(num_te, cat_te), teacher.proba(ev_num, ev_cat)
    s_te, s_ev = student.predict_proba(x_te), student.predict_proba(x_ev)
    l_te, l_ev = label_student.predict_proba(x_te), label_student.predict_proba(x_ev)

    fid_te = fidelity(t_te.argmax(1), s_te.argmax(1), class_names)
    fid_ev = fidelity(t_ev.argmax(1), s_ev.argmax(1), class_names)
    figures = {
        **{f"teacher_{k}": v for k, v in quality(t_te, y_te).items()},
        **{f"student_{k}": v for k, v in quality(s_te, y_te).items()},
        **{f"label_student_{k}": v for k, v in quality(l_te, y_te).items()},
        "fidelity_test": fid_te["agreement"],
        "fidelity_neighbourhood": fid_ev["agreement"],
        "label_student_fidelity_test": fidelity(t_te.argmax(1), l_te.argmax(1), class_names)["agreement"],
        "label_student_fidelity_neighbourhood": fidelity(t_ev.argmax(1), l_ev.argmax(1), class_names)["agreement"],
        **{f"student_{k}": v for k, v in student.size().items()},
        **{f"label_student_{k}": v for k, v in label_student.size().items()},
        "teacher_seconds": teacher_seconds,
        "student_seconds": student_seconds,
    }
    return {
        "figures": figures,
        "per_class_test": fid_te["per_class"],
        "per_class_neighbourhood": fid_ev["per_class"],
        "encoder": encoder,
        "teacher": teacher,
        "trained": trained,
        "student": student,
        "label_student": label_student,
        "x_train": x_tr,
        "train_rows": len(train_idx),
        "test_rows": len(test_idx),
    }


def _write_run(run_dir: Path, cfg: InterpretConfig, metrics: dict, saved: dict, log: Log) -> None:
    import sklearn

    run_dir.mkdir(parents=True, exist_ok=True)
    encoder, student = saved["encoder"], saved["student"]
    write_text(run_dir / "config.yaml", dump_interpret_config(cfg))
    write_json(run_dir / "encoder.json", encoder.to_json())
    spec = student.to_json()
    write_json(run_dir / "student.json", {**spec, "feature_names": encoder.feature_names})
    write_json(
        run_dir / "label_student.json", {**saved["label_student"].to_json(), "feature_names": encoder.feature_names}
    )
    rules = None
    if spec["kind"] == "decision_tree":
        rules = tree_rules(spec, encoder, encoder.class_names, saved["x_train"])
        text = (
            f"# {len(rules)} rules of the distilled tree (seed {cfg.run.seeds[0]}); p is the leaf's probability of "
            "its class.\n\n"
            + rules_text(rules)
            + "\n# The tree as scikit-learn prints it\n\n"
            + student.outline(encoder.feature_names)
        )
    else:
        text = coefficients_text(spec, encoder.feature_names, encoder.class_names)
    write_text(run_dir / "rules.txt", text)

    skops_files = []
    if cfg.run.save_skops and have_skops():
        save_skops(student.model, run_dir / "student.skops")
        skops_files.append("student.skops")
        for i, (member, trained) in enumerate(zip(saved["teacher"].members, saved["trained"])):
            if trained and cfg.teacher.members[i].kind in TRAINED and cfg.teacher.members[i].kind != "mlp":
                save_skops(member.estimator, run_dir / "teacher" / f"member_{i}.skops")
                skops_files.append(f"teacher/member_{i}.skops")
    env = {
        "python": platform.python_version(),
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "seeds": list(cfg.run.seeds),
        "skops_files": skops_files,
    }
    write_json(run_dir / "env.json", env)
    write_interpret_report(run_dir, cfg=cfg, metrics=metrics, saved=saved, rules=rules, env=env)
    log(f"run directory: {run_dir} (report: {run_dir / 'report.md'})")


def coefficients_text(spec: dict, feature_names: list[str], class_names: list[str]) -> str:
    """The non-zero coefficients of a logistic student, largest first, per class (one list for two classes)."""
    coef = np.asarray(spec["coef"])
    rows = [class_names[1]] if coef.shape[0] == 1 else [class_names[k] for k in spec["classes"]]
    lines = [
        "# Non-zero coefficients of the L1 logistic regression, per standard deviation of the feature.",
        "# A positive coefficient raises the log-odds of the class named.",
    ]
    for r, name in enumerate(rows):
        order = np.argsort(-np.abs(coef[r]))
        lines.append(f"\n## {name} (intercept {spec['intercept'][r]:+.4f})")
        lines += [f"{coef[r, j]:+.4f}  {feature_names[j]}" for j in order if coef[r, j] != 0]
        if not np.any(coef[r] != 0):
            lines.append("(no non-zero coefficient: the intercept alone)")
    return "\n".join(lines) + "\n"


def _student_settings(cfg: InterpretConfig) -> str:
    s = cfg.student
    if s.kind == "decision_tree":
        t = s.tree
        return (
            f"max_depth={t.max_depth}, max_leaf_nodes={t.max_leaf_nodes}, min_samples_leaf={t.min_samples_leaf}, "
            f"targets={t.targets}"
        )
    return f"C={s.logistic.C}, targets={s.logistic.targets}"


def _pool_per_class(per_seed: list[dict]) -> dict:
    """Per class: points the teacher put there and the share the student agreed on, pooled over seeds."""
    out = {}
    for name in per_seed[0]:
        n = sum(row[name]["n"] for row in per_seed)
        agreed = sum(row[name]["n"] * row[name]["agreement"] for row in per_seed if row[name]["n"])
        out[name] = {"n": n, "agreement": agreed / n if n else float("nan")}
    return out


def _low_fidelity(summary: dict, threshold: float) -> list[str]:
    warnings = []
    for key, where in (("fidelity_test", "the test rows"), ("fidelity_neighbourhood", "points around the test rows")):
        value = summary[key]["mean"]
        if value < threshold:
            warnings.append(
                f"fidelity on {where} is {100 * value:.1f}% (< {100 * threshold:.0f}%): the student does not explain "
                "the teacher there; do not read its rules as the teacher's reasoning"
            )
    return warnings
