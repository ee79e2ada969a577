"""The tabular task's flow (kdkit.tasks.tabular.Tabular calls it; scikit-learn loads with it, not with the
task registry). Tabular (data.task: tabular, or `kind: interpret`): a teacher on a table distilled into a student a
person can read (a limited decision tree or a sparse logistic regression), with its fidelity to the teacher.

Data: one table (kdkit.interpret.tabular: built-in, csv, parquet, hf, arrays), its target and its feature columns.
Per seed the rows may be split anew (data.resplit_each_seed), so the encoder and the teacher belong to a seed:
TabularTeachers fits them on demand, once per seed, on that seed's training rows. Phases: "baseline" fits the
interpretable model on the labels alone; "student" fits it on the teacher's class probabilities over the training
rows plus synthetic points around them (kdkit.interpret.neighbourhood). Each phase measures its student on the test
rows and on synthetic points around them when it is fit, and keeps the figures in its result.json, so evaluation
aggregates them (tabular_eval). The first seed's student is the one kept (there is no validation score to choose).
With student.auto the student phase first chooses its setting within the seed's training split
(kdkit.interpret.auto) and keeps the choice in its result.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kdkit.interpret.auto import (
    LABELS_ALONE,
    candidates,
    choose,
    chosen_setting,
    describe,
    fit_setting,
    given_setting,
    student_targets,
    teacher_fitter,
    value_of,
)
from kdkit.interpret.config import InterpretConfig
from kdkit.interpret.fidelity import quality
from kdkit.interpret.neighbourhood import sample_codes
from kdkit.interpret.predict import FittedStudent, load_student_folder, save_student_folder
from kdkit.interpret.tabular import TabularEncoder, encode_target, load_frame, select_columns, split_rows
from kdkit.interpret.teachers import TRAINED, TabularTeacher, build_teacher, have_skops, save_skops
from kdkit.run import Phase, Recipe, RunDir
from kdkit.tasks.tabular_eval import measure

EVAL_SEED_OFFSET = 1_000_003  # the evaluation neighbourhood's random stream, apart from the fitting one's


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class TabularData:
    """The whole table (rows without a target dropped), its columns and its class ids; split per seed."""

    frame: object  # pandas DataFrame
    y: np.ndarray  # (N,) int64 class ids
    class_names: list[str]
    features: list[str]
    numeric: list[str]
    categorical: list[str]
    dropped: int
    test_fraction: float
    split_seed: int
    resplit_each_seed: bool
    limit: int | None

    def split(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(train rows, test rows) of a seed: the same split for every seed, or split_seed + seed per seed."""
        return split_rows(
            self.y, self.test_fraction, self.split_seed + (seed if self.resplit_each_seed else 0), self.limit
        )


def load_table(cfg: InterpretConfig) -> TabularData:
    d = cfg.data
    frame = load_frame(d)
    features, numeric, categorical = select_columns(frame, d)
    y, class_names, keep = encode_target(frame, d.target)
    frame = frame[keep].reset_index(drop=True)
    return TabularData(
        frame, y, class_names, features, numeric, categorical, int((~keep).sum()), d.test_fraction, d.split_seed,
        d.resplit_each_seed, d.limit,
    )


# ---------------------------------------------------------------------------------------------------------------
# Teacher, per seed


@dataclass
class SeedTeacher:
    """One seed's split, encoder and fitted teacher, with the teacher's answers on the test rows and on the
    evaluation neighbourhood (synthetic points around the test rows, never fit on)."""

    seed: int
    encoder: TabularEncoder
    teacher: TabularTeacher
    num_tr: np.ndarray
    cat_tr: np.ndarray
    y_tr: np.ndarray
    num_te: np.ndarray
    cat_te: np.ndarray
    y_te: np.ndarray
    ev_num: np.ndarray
    ev_cat: np.ndarray
    t_te: np.ndarray  # (test rows, C) teacher probabilities
    t_ev: np.ndarray  # (eval points, C)
    seconds: float  # fitting the teacher
    figures: dict  # the teacher's quality on the test rows, and its fitting seconds


class TabularTeachers:
    """The teacher of every seed, fit on demand on that seed's training rows and kept for the run (each seed may
    split the rows anew, so each seed has its own encoder and teacher). A seed's teacher is fit again, identically
    (every random stream is seeded), when a finished run is evaluated again."""

    def __init__(self, cfg: InterpretConfig, data: TabularData, run: RunDir):
        self.cfg, self.data, self.run = cfg, data, run
        self.members = [m.kind for m in cfg.teacher.members]
        self._seeds: dict[int, SeedTeacher] = {}

    def __call__(self, seed: int) -> SeedTeacher:
        if seed not in self._seeds:
            self._seeds[seed] = self._fit(seed)
        return self._seeds[seed]

    def _fit(self, seed: int) -> SeedTeacher:
        cfg, data, d, nb = self.cfg, self.data, self.cfg.data, self.cfg.neighbourhood
        train_idx, test_idx = data.split(seed)
        train_frame, test_frame = data.frame.iloc[train_idx], data.frame.iloc[test_idx]
        encoder = TabularEncoder.fit(
            train_frame, d.target, data.class_names, data.numeric, data.categorical, d.encoding, d.impute,
            d.unseen_category, d.max_levels,
        )
        num_tr, cat_tr = encoder.codes(train_frame)
        num_te, cat_te = encoder.codes(test_frame)
        y_tr, y_te = data.y[train_idx], data.y[test_idx]
        started = time.perf_counter()
        teacher, trained = build_teacher(cfg.teacher, encoder, seed, self.run.device)
        teacher.fit(num_tr, cat_tr, y_tr, trained)
        seconds = time.perf_counter() - started
        ev_num, ev_cat = sample_codes(
            encoder, num_te, cat_te, nb.eval_points, "perturb", nb.scale, nb.category_resample, seed + EVAL_SEED_OFFSET
        )
        t_te = teacher.proba(num_te, cat_te)
        fitted = SeedTeacher(
            seed, encoder, teacher, num_tr, cat_tr, y_tr, num_te, cat_te, y_te, ev_num, ev_cat, t_te,
            teacher.proba(ev_num, ev_cat), seconds, {**quality(t_te, y_te), "seconds": seconds},
        )
        if seed == cfg.run.seeds[0]:
            self._save_members(teacher, trained)
        return fitted

    def _save_members(self, teacher: TabularTeacher, trained: list[bool]) -> None:
        """teachers/member_<i>.skops: the kept seed's teachers trained here (scikit-learn ones), when configured."""
        run = self.run
        if run.read_only or not run.is_main or not self.cfg.run.save_skops or not have_skops():
            return
        for i, (member, fit_here) in enumerate(zip(teacher.members, trained)):
            if fit_here and self.members[i] in TRAINED and self.members[i] != "mlp":
                save_skops(member.estimator, run.path / "teachers" / f"member_{i}.skops")


# ---------------------------------------------------------------------------------------------------------------
# Students


def tabular_recipe(cfg: InterpretConfig, data: TabularData, teachers: TabularTeachers, run: RunDir) -> Recipe:
    """Per seed: the interpretable model on the labels alone (baseline), then on the teacher's soft labels over the
    training rows and synthetic points around them (student). With student.auto, the student's setting (labels
    alone among the candidates) is chosen per seed by cross-validation within its training split first."""
    nb, n_classes, auto = cfg.neighbourhood, len(data.class_names), cfg.student.auto
    formula = (
        f"{cfg.student.kind} fit to the teacher's {student_targets(cfg.student)} targets on the training rows + "
        f"{nb.points} synthetic points"
    )
    if auto.enabled:
        names = ", ".join(describe(c.name) for c in candidates(cfg))
        formula = (
            f"{cfg.student.kind} whose setting is chosen per seed by {auto.folds}-fold validation {auto.metric} within "
            f"the training split among: {names}"
        )
    run.log(f"student: {formula}; baseline: the same on the labels")

    def fit(phase: Phase) -> tuple[FittedStudent, dict]:
        s = teachers(phase.seed)
        started = time.perf_counter()
        record = None
        if phase.kind == "baseline":
            setting = LABELS_ALONE
        elif auto.enabled:
            fit_teacher = teacher_fitter(cfg.teacher, s.encoder, phase.seed, run.device)
            record = choose(cfg, s.encoder, s.num_tr, s.cat_tr, s.y_tr, phase.seed, fit_teacher, data.class_names)
            setting = chosen_setting(record)
            chosen, labels = value_of(record, record["chosen"]), value_of(record, "labels")
            run.log(
                f"{phase.name}: auto chose {describe(record['chosen'])}: validation {auto.metric} "
                f"{100 * chosen:.2f}% vs labels alone {100 * labels:.2f}%"
            )
        else:
            setting = given_setting(cfg)
        student = fit_setting(
            cfg.student, setting, n_classes, phase.seed, s.encoder, s.teacher, s.num_tr, s.cat_tr, s.y_tr, nb
        )
        model = FittedStudent(student, s.encoder, phase.seed)
        summary = measure(model, s, data.class_names, time.perf_counter() - started)
        if record is not None:
            summary["auto"] = record
        f = summary["test"]
        run.log(
            f"{phase.name}: teacher {100 * s.figures['accuracy']:.2f}% | {phase.kind} {100 * f['accuracy']:.2f}% | "
            f"fidelity test {100 * f['fidelity_test']:.2f}%, neighbourhood {100 * f['fidelity_neighbourhood']:.2f}%"
        )
        return model, summary

    return Recipe(["baseline", "student"], fit, save_student_folder, load_student_folder, formula, None)
