"""student.auto (kdkit train --auto on a tabular config): no-regret distillation for interpretable students.

Per seed, before the distilled student is fit, its setting is chosen within that seed's training split (the test
split is never seen) among:

    labels alone      the student fit on the labels, as the baseline is: always a candidate, and the first
    targets@points    the student fit to the teacher's soft probabilities or hard top class on the training rows
                      plus `points` synthetic points around them; every pair of student.auto.points ×
                      student.auto.targets, and the configured pair (neighbourhood.points, the student's targets)

How: stratified K-fold cross-validation (student.auto.folds). In each fold the teacher is fit again on the other
folds, since a teacher fit on the validation rows has learnt their labels and would hand them to every distilled
candidate; then every candidate is fit on the other folds and predicts the held-out one. The held-out predictions
are pooled over the folds into one validation figure per candidate (every training row is a validation row once; a
single 20% split of the demo's 426 rows holds 85, where one row is 1.2 points). The best figure wins; a tie goes to
the simpler candidate (labels alone, then fewer points, then hard targets), so the choice is never worse than labels
alone on validation. The chosen setting is then fit on the whole training split with the seed's own teacher,
exactly as the student is without auto (fit_setting serves both).

A literal grid, not Optuna: the space is a handful of discrete settings (9 by default) and each is scored on every
fold; a sampler would only score a subset of the same grid.

The encoder (imputation values, ranges, levels: no labels) is the seed's own, as for the final student. A teacher
loaded from skops is loaded fitted, not refit per fold: if it learnt from these rows, validation favours distilling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kdkit.errors import DataError
from kdkit.evaluate.schema import spread
from kdkit.interpret.fidelity import quality
from kdkit.interpret.neighbourhood import sample_codes
from kdkit.interpret.students import build_student
from kdkit.interpret.tabular import TabularEncoder
from kdkit.interpret.teachers import TabularTeacher, build_teacher

TARGET_ORDER = ("hard", "soft")  # hard first: on a tie, the top class is the simpler target

FitTeacher = Callable[[np.ndarray, np.ndarray, np.ndarray], TabularTeacher]  # (num, cat, y) → a fitted teacher


@dataclass(frozen=True)
class Setting:
    """How the student learns: labels alone (points None), or the teacher's `targets` on the training rows plus
    `points` synthetic points around them."""

    points: int | None = None
    targets: str | None = None

    @property
    def distils(self) -> bool:
        return self.points is not None

    @property
    def name(self) -> str:
        return f"{self.targets}@{self.points}" if self.distils else "labels"


LABELS_ALONE = Setting()


def student_targets(section) -> str:
    """The targets the student section configures (tree or logistic, by its kind)."""
    return section.tree.targets if section.kind == "decision_tree" else section.logistic.targets


def given_setting(cfg) -> Setting:
    """The setting the config asks for: neighbourhood.points synthetic points, the student's targets."""
    return Setting(cfg.neighbourhood.points, student_targets(cfg.student))


def candidates(cfg) -> list[Setting]:
    """Labels alone, then the grid student.auto.points × targets with the configured setting, simplest first
    (fewer points, then hard before soft): the order that breaks ties."""
    auto = cfg.student.auto
    grid = {Setting(p, t) for p in auto.points for t in auto.targets} | {given_setting(cfg)}
    return [LABELS_ALONE, *sorted(grid, key=lambda s: (s.points, TARGET_ORDER.index(s.targets)))]


def with_targets(section, targets: str):
    """A copy of the student section whose targets are `targets`."""
    if section.kind == "decision_tree":
        return section.model_copy(update={"tree": section.tree.model_copy(update={"targets": targets})})
    return section.model_copy(update={"logistic": section.logistic.model_copy(update={"targets": targets})})


def fit_setting(
    section, setting: Setting, n_classes: int, seed: int, encoder: TabularEncoder, teacher: TabularTeacher | None,
    num: np.ndarray, cat: np.ndarray, y: np.ndarray, nb, transfer: tuple[np.ndarray, np.ndarray] | None = None,
):
    """The student of one setting fit on the rows (num, cat) with labels y: on the labels alone, or on the teacher's
    targets over the rows plus setting.points synthetic points around them (transfer_set; nb: the neighbourhood
    section). The plain student (no auto) and every candidate are fit here. transfer: that set when already made
    (candidates that differ only in their targets share it)."""
    if not setting.distils:
        return build_student(section, n_classes, seed).fit_labels(encoder.matrix(num, cat), y)
    x, probs = transfer if transfer is not None else transfer_set(encoder, teacher, num, cat, setting.points, nb, seed)
    return build_student(with_targets(section, setting.targets), n_classes, seed).fit_teacher(x, probs)


def transfer_set(
    encoder: TabularEncoder, teacher: TabularTeacher, num: np.ndarray, cat: np.ndarray, points: int, nb, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(encoded points, the teacher's probabilities on them): the real rows plus `points` synthetic points around
    them, drawn with `seed` (kdkit.interpret.neighbourhood)."""
    syn_num, syn_cat = sample_codes(encoder, num, cat, points, nb.method, nb.scale, nb.category_resample, seed)
    fit_num, fit_cat = np.vstack([num, syn_num]), np.vstack([cat, syn_cat])
    return encoder.matrix(fit_num, fit_cat), teacher.proba(fit_num, fit_cat)


def teacher_fitter(section, encoder: TabularEncoder, seed: int, device: str = "cpu") -> FitTeacher:
    """The config's teacher, fit afresh on the rows it is given (one fold's), as the seed's teacher is fit."""

    def fit(num: np.ndarray, cat: np.ndarray, y: np.ndarray) -> TabularTeacher:
        teacher, trained = build_teacher(section, encoder, seed, device)
        return teacher.fit(num, cat, y, trained)

    return fit


def folds_of(y: np.ndarray, folds: int, seed: int, class_names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, validation rows) of each stratified fold; every class needs a row in every fold."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=len(class_names))
    present = counts > 0
    if counts[present].min() < folds:
        k = int(np.flatnonzero(present)[np.argmin(counts[present])])
        raise DataError(
            f"student.auto.folds: {folds}, but class {class_names[k]!r} has {counts[k]} rows in the training split; "
            f"expected at most {counts[k]} folds (or more rows)"
        )
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def choose(
    cfg, encoder: TabularEncoder, num: np.ndarray, cat: np.ndarray, y: np.ndarray, seed: int, fit_teacher: FitTeacher,
    class_names: list[str],
) -> dict:
    """One seed's choice (its phase's result.json keeps it): {"metric", "direction", "folds", "candidates": [{name,
    points, targets, value}] in tie order, "chosen": name, "given": name of the configured setting}. num, cat, y:
    the seed's training rows, the only rows it reads."""
    auto, nb, n_classes = cfg.student.auto, cfg.neighbourhood, len(class_names)
    settings = candidates(cfg)
    pooled = np.zeros((len(settings), len(y), n_classes))  # held-out probabilities of each candidate
    failed: set[int] = set()  # candidates that cannot be fit (a logistic student on one class): never chosen
    for fit_rows, val_rows in folds_of(y, auto.folds, seed, class_names):
        f_num, f_cat, f_y = num[fit_rows], cat[fit_rows], y[fit_rows]
        teacher = fit_teacher(f_num, f_cat, f_y)
        x_val = encoder.matrix(num[val_rows], cat[val_rows])
        made: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # transfer sets by points, shared by the targets
        for i, setting in enumerate(settings):
            if i in failed:
                continue
            if setting.distils and setting.points not in made:
                made[setting.points] = transfer_set(encoder, teacher, f_num, f_cat, setting.points, nb, seed)
            try:
                student = fit_setting(
                    cfg.student, setting, n_classes, seed, encoder, teacher, f_num, f_cat, f_y, nb,
                    made.get(setting.points),
                )
            except DataError:  # e.g. the teacher puts every point in one class: nothing to fit a classifier to
                failed.add(i)
                continue
            pooled[i, val_rows] = student.predict_proba(x_val)
    # accuracy or macro F1: higher is better
    values = [None if i in failed else float(quality(probs, y)[auto.metric]) for i, probs in enumerate(pooled)]
    best = pick(values)
    return {
        "metric": auto.metric,
        "direction": "maximize",
        "folds": auto.folds,
        "candidates": [
            {"name": s.name, "points": s.points, "targets": s.targets, "value": v}
            for s, v in zip(settings, values)
        ],
        "chosen": settings[best].name,
        "given": given_setting(cfg).name,
    }


def pick(values: list[float | None]) -> int:
    """Position of the highest value; a tie goes to the earlier (simpler) candidate; None (not fit) never wins.
    The first value (labels alone) is always a number."""
    best = 0
    for i, value in enumerate(values):
        if value is not None and value > values[best]:
            best = i
    return best


def chosen_setting(record: dict) -> Setting:
    """The Setting a seed's record chose."""
    row = next(c for c in record["candidates"] if c["name"] == record["chosen"])
    return Setting(row["points"], row["targets"])


def value_of(record: dict, name: str) -> float | None:
    """A candidate's validation figure in one seed's record (None: it could not be fit)."""
    return next(c["value"] for c in record["candidates"] if c["name"] == name)


def summarise(records: list[dict], seeds: list[int]) -> dict:
    """metrics.json's `student_auto`: per candidate its validation figure over the seeds (mean, std, per seed) and
    the seeds that chose it; per seed the choice against labels alone; how many seeds distil."""
    first = records[0]
    rows = []
    for c in first["candidates"]:
        values = [math.nan if value_of(r, c["name"]) is None else value_of(r, c["name"]) for r in records]
        rows.append({
            "name": c["name"],
            "points": c["points"],
            "targets": c["targets"],
            "given": c["name"] == first["given"],
            "validation": spread(values),
            "chosen_by": [s for s, r in zip(seeds, records) if r["chosen"] == c["name"]],
        })
    per_seed = [
        {"seed": s, "chosen": r["chosen"], "value": value_of(r, r["chosen"]), "labels_only": value_of(r, "labels")}
        for s, r in zip(seeds, records)
    ]
    return {
        "search": "grid",
        "metric": first["metric"],
        "direction": first["direction"],
        "folds": first["folds"],
        "given": first["given"],
        "candidates": rows,  # in tie order: labels alone first
        "per_seed": per_seed,
        "distils": sum(1 for row in per_seed if row["chosen"] != "labels"),
        "seeds": len(seeds),
    }


def describe(name: str) -> str:
    """A candidate's name in words: "labels alone", "soft targets, 20,000 points"."""
    if name == "labels":
        return "labels alone"
    targets, points = name.split("@")
    return f"{targets} targets, {int(points):,} points"


def choice_counts(summary: dict) -> str:
    """"labels alone in 6 of 10 seeds; soft targets, 20,000 points in 4" (most chosen first)."""
    rows = sorted((r for r in summary["candidates"] if r["chosen_by"]), key=lambda r: -len(r["chosen_by"]))
    n = summary["seeds"]
    parts = [f"{describe(r['name'])} in {len(r['chosen_by'])}" for r in rows]
    return "; ".join([parts[0] + f" of {n} seed{'s' if n != 1 else ''}", *parts[1:]])


def auto_line(summary: dict) -> str:
    """One line for the log: what was chosen, and the validation figure of the choices against labels alone."""
    metric, per_seed = summary["metric"], summary["per_seed"]
    chosen = float(np.mean([r["value"] for r in per_seed]))
    labels = float(np.mean([r["labels_only"] for r in per_seed]))
    return (
        f"auto: chose {choice_counts(summary)}: validation {metric} {_fmt(metric, chosen)} vs labels alone "
        f"{_fmt(metric, labels)} (mean over seeds; {summary['folds']}-fold, {len(summary['candidates'])} candidates)"
    )


def _fmt(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%"
