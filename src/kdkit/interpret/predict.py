"""A fitted interpretable student with the encoder of its training split, its folder (student.json + encoder.json,
no scikit-learn object and no pickle), and prediction from a table.

A folder holds:
  student.json   the student (kdkit.interpret.students), with the encoded feature names and the seed
  encoder.json   the fitted encoding of the table (kdkit.interpret.tabular.TabularEncoder)
  rules.txt      the tree as rules, or the non-zero coefficients (RUN_DIR/student)
  student.skops  the scikit-learn object, when skops is installed and run.save_skops is on (RUN_DIR/student)
Every phase of a run keeps its student this way (RUN_DIR/phases/<phase>/), and RUN_DIR/student is the kept one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.atomic import write_json, write_text
from kdkit.errors import DataError
from kdkit.interpret.students import coefficients_text, predict_json, rules_text, student_from_json, tree_rules
from kdkit.interpret.tabular import TabularEncoder


@dataclass
class FittedStudent:
    """An interpretable student (TreeStudent or LogisticStudent) and the encoder fit on its seed's training rows:
    what a phase of the tabular task trains, saves and loads."""

    student: Any
    encoder: TabularEncoder
    seed: int | None = None  # the run's seed that fit it (its split, its encoder)

    @property
    def kind(self) -> str:
        return self.student.kind

    def proba_codes(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for rows given as codes (kdkit.interpret.tabular)."""
        return self.student.predict_proba(self.encoder.matrix(num, cat))

    def predict_proba(self, frame) -> np.ndarray:
        """Class probabilities (N, C) for a DataFrame with the feature columns, in the order of the class names."""
        return self.student.predict_proba(self.encoder.transform(frame))


def save_student_folder(
    model: FittedStudent, folder: str | Path, x_train: np.ndarray | None = None, note: str = "", skops: bool = False
) -> Path:
    """Write student.json and encoder.json, and with x_train (the encoded training rows: the rules count them)
    rules.txt; with skops, student.skops too. note: the first line of rules.txt (which seed, ...)."""
    from kdkit.interpret.teachers import save_skops

    folder = Path(folder)
    encoder, spec = model.encoder, model.student.to_json()
    write_json(folder / "encoder.json", encoder.to_json())
    write_json(folder / "student.json", {**spec, "feature_names": encoder.feature_names, "seed": model.seed})
    if x_train is not None:
        write_text(folder / "rules.txt", rules_file(model, x_train, note))
    if skops and model.student.model is not None:
        save_skops(model.student.model, folder / "student.skops")
    return folder


def load_student_folder(folder: str | Path) -> FittedStudent:
    """The student of a folder written by save_student_folder (RUN_DIR/student, or a phase's folder)."""
    folder = Path(folder)
    parts = []
    for name in ("encoder.json", "student.json"):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder}: no {name}; expected a student folder written by the tabular task")
        try:
            parts.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
    encoder = TabularEncoder.from_json(parts[0])
    spec = {k: v for k, v in parts[1].items() if k not in ("feature_names", "seed")}
    return FittedStudent(student_from_json(spec), encoder, parts[1].get("seed"))


def rules_file(model: FittedStudent, x_train: np.ndarray, note: str = "") -> str:
    """rules.txt: the tree's rules (and scikit-learn's outline of it when the fitted object is at hand), or the
    non-zero coefficients of a logistic student."""
    encoder, spec = model.encoder, model.student.to_json()
    if spec["kind"] != "decision_tree":
        return coefficients_text(spec, encoder.feature_names, encoder.class_names)
    rules = tree_rules(spec, encoder, encoder.class_names, x_train)
    text = (
        f"# {len(rules)} rules of the distilled tree{note}; p is the leaf's probability of its class.\n\n"
        + rules_text(rules)
    )
    outline = model.student.outline(encoder.feature_names)
    if outline is not None:
        text += "\n# The tree as scikit-learn prints it\n\n" + outline
    return text


def _student_dir(path: Path) -> Path:
    """A run directory's student/ folder, or the folder itself."""
    return path / "student" if (path / "student" / "student.json").is_file() else path


def load_run(run_dir: str | Path) -> tuple[TabularEncoder, dict]:
    """(encoder, student spec) of a run directory of the tabular task (its student/ folder), or of a student
    folder."""
    model = load_student_folder(_student_dir(Path(run_dir)))
    return model.encoder, model.student.to_json()


def predict_table(run_dir: str | Path, frame) -> np.ndarray:
    """Class probabilities (N, C) of the run's kept student for a DataFrame with the feature columns (the target
    column may be there or not), encoded exactly as in training. Class order: encoder.json's class_names."""
    encoder, spec = load_run(run_dir)
    return predict_json(spec, encoder.transform(frame))
