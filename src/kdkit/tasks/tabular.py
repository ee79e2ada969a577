"""Tabular (data.task: tabular, or `kind: interpret`): a teacher on a table distilled into a student a person can
read (a limited decision tree or a sparse logistic regression), with its fidelity to the teacher.

This module is the task's face in TASKS and stays light: its flow (kdkit.tasks.tabular_flow, kdkit.interpret) loads
scikit-learn only when a tabular run or check needs it, so `kdkit validate` of another task's config does not pay
for it. See tabular_flow for the data, the per-seed teachers and the phases, and tabular_eval for evaluation.
"""

from __future__ import annotations

from pathlib import Path

from kdkit.interpret.config import InterpretConfig, dump_interpret_config, load_interpret_config
from kdkit.report.table import TABULAR_COLUMNS
from kdkit.run import Recipe, RunDir


class Tabular:
    name = "tabular"
    columns = TABULAR_COLUMNS
    search_metrics: tuple[str, ...] = ()  # no validation split: nothing for a search to optimise
    auto_switch = "student.auto"  # `kdkit train --auto` sets <auto_switch>.enabled (kdkit.interpret.auto)
    shipping = (
        "its student is a readable model (RUN_DIR/student: student.json, encoder.json, rules.txt, and student.skops "
        "when skops is installed); predict with kdkit.interpret.predict_table(RUN_DIR, frame), no torch needed"
    )

    def load_config(self, config: str | Path | dict, overrides: tuple[str, ...]) -> InterpretConfig:
        return load_interpret_config(config, overrides)

    def dump_config(self, cfg: InterpretConfig) -> str:
        return dump_interpret_config(cfg)

    def check(self, cfg: InterpretConfig) -> None:
        from kdkit.interpret.teachers import check_teacher

        check_teacher(cfg.teacher)

    def load_data(self, cfg: InterpretConfig, run: RunDir):
        from kdkit.tasks.tabular_flow import load_table

        data = load_table(cfg)
        dropped = f" ({data.dropped} rows without a target dropped)" if data.dropped else ""
        run.log(
            f"data: {len(data.frame)} rows, {len(data.numeric)} numeric + {len(data.categorical)} categorical "
            f"features, {len(data.class_names)} classes{dropped}"
        )
        return data

    def build_teacher(self, cfg: InterpretConfig, data, run: RunDir):
        from kdkit.interpret.students import student_settings
        from kdkit.interpret.teachers import check_teacher
        from kdkit.tasks.tabular_flow import TabularTeachers

        check_teacher(cfg.teacher)
        kinds = "+".join(m.kind for m in cfg.teacher.members)
        auto = cfg.student.auto
        run.log(
            f"teacher: {kinds} → student: {cfg.student.kind} ({student_settings(cfg.student)}); "
            f"{cfg.neighbourhood.points} synthetic points"
            + (f"; student.auto: chosen per seed by {auto.folds}-fold validation {auto.metric}" if auto.enabled else "")
        )
        return TabularTeachers(cfg, data, run)

    def recipe(self, cfg, data, teacher, run, on_epoch=None) -> Recipe:
        from kdkit.tasks.tabular_flow import tabular_recipe

        return tabular_recipe(cfg, data, teacher, run)

    def evaluate(self, cfg, data, teacher, results, run, best, recipe=None) -> tuple[dict, dict]:
        from kdkit.tasks import tabular_eval

        return tabular_eval.evaluate(cfg, data, teacher, results, run, best)

    def save_student(self, model, folder: Path, data, cfg: InterpretConfig) -> None:
        from kdkit.interpret.predict import save_student_folder
        from kdkit.interpret.teachers import have_skops
        from kdkit.tasks.tabular_eval import train_matrix

        skops = cfg.run.save_skops and have_skops()
        save_student_folder(model, folder, train_matrix(data, model), f" (seed {model.seed})", skops)

    def load_student(self, folder: Path):
        from kdkit.interpret.predict import load_student_folder

        return load_student_folder(folder)

    def report(self, cfg, run, metrics, histories, recipe, extras) -> None:
        from kdkit.tasks import tabular_eval

        tabular_eval.report(cfg, run, metrics, extras)
