"""The config of the tabular task (`kdkit interpret`, `kdkit train`): a teacher on a table, distilled into a
student a person can read.

Small frozen sections, validated on load, every error reported at once with its field path, as in kdkit.config
(whose public loading functions it uses). Imports no torch and no scikit-learn, so `kdkit validate` stays instant on
these configs too. A YAML file says `kind: interpret` at the top (or `data.task: tabular`); that is how
kdkit.tasks.task_of tells it from a classification or language-model config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from kdkit.config import Section, apply_overrides, read_yaml, validate_root
from kdkit.registry import suggest

# The names kdkit.interpret.teachers.TEACHERS and kdkit.interpret.students.STUDENTS register (a test keeps them
# equal). Written out here so that validating a config imports no scikit-learn.
TEACHER_KINDS = ("random_forest", "extra_trees", "gradient_boosting", "hist_gradient_boosting", "mlp", "skops")
STUDENT_KINDS = ("decision_tree", "logistic_l1")
BUILTIN_TABLES = ("breast_cancer", "wine", "iris", "digits")


class InterpretRunConfig(Section):
    """The run as a whole."""

    name: str = Field("interpret", description="Name of the run; the run directory is out_dir/name.")
    out_dir: str = Field("runs", description="Parent folder of run directories (relative to the working directory).")
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Seeds of the teacher, the synthetic points and the student; figures are mean ± std over them. "
        "The first seed's student is the one saved.",
    )
    save_skops: bool = Field(
        True,
        description="Also write student/student.skops and teachers/member_<i>.skops (scikit-learn objects, safe to "
        "load) when skops is installed; student/student.json is written always. Importing skops costs a few seconds.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu",
        description="Where an mlp teacher trains (the scikit-learn models always run on the CPU); auto: CUDA when "
        "available.",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads (an mlp teacher); default: torch's choice.")


class TabularDataConfig(Section):
    """A table: where it comes from, which column is the target, how the other columns are encoded."""

    task: Literal["tabular"] = Field(
        "tabular", description="The task (kdkit.tasks.TASKS): a table distilled into an interpretable student."
    )
    source: Literal["builtin", "csv", "parquet", "hf", "arrays"] = Field(
        "builtin",
        description="builtin: a scikit-learn table (`name`: breast_cancer, wine, iris, digits); csv/parquet: a file "
        "read with pandas; hf: Hugging Face `datasets` (a name, or a builder such as csv/parquet with `data_files`); "
        "arrays: an .npz with `x` (N, D) and `y`, e.g. embeddings of an image or text model (columns x0..x{D-1}).",
    )
    name: str | None = Field("breast_cancer", description="Built-in table, or the `datasets` name/builder for hf.")
    path: str | None = Field(None, description="File for csv, parquet and arrays.")
    data_files: str | list[str] | None = Field(None, description="Files passed to `datasets.load_dataset` (hf).")
    split: str = Field("train", description="Split of the `datasets` data set to read (hf).")
    target: str = Field("target", description="The target column (builtin tables and arrays call it `target`).")
    features: list[str] | None = Field(None, description="Feature columns; default: every column but the target.")
    categorical: list[str] | None = Field(
        None,
        description="Columns read as categories; default: every column that is not numeric (text, bool, category).",
    )
    numeric: list[str] | None = Field(
        None,
        description="Columns read as numbers even if stored as text (a value that is not a number is an error); "
        "default: the columns pandas reads as numbers.",
    )
    encoding: Literal["onehot", "ordinal"] = Field(
        "onehot",
        description="How categories become numbers: onehot (one 0/1 column per level) or ordinal (one column of "
        "level codes, levels in sorted order). Recorded in encoder.json so that prediction uses the same encoding.",
    )
    impute: Literal["median", "mean"] = Field(
        "median",
        description="Missing numbers are replaced by this statistic of the training split (recorded in encoder.json);"
        " a missing category is a level of its own, `(missing)`.",
    )
    unseen_category: Literal["other", "error"] = Field(
        "other",
        description="A category met at prediction that training never saw: other puts it in an `other` bucket (all "
        "one-hot columns 0; ordinal code = number of levels); error stops with the column and the values.",
    )
    max_levels: int = Field(
        50,
        ge=2,
        description="Most levels a categorical column may have; more usually means free text or an id, which the "
        "encoder cannot read as a category.",
    )
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Share of the rows held out for the test split.")
    split_seed: int = Field(0, description="Seed of the stratified train/test split.")
    resplit_each_seed: bool = Field(
        False,
        description="Draw a new split per seed (split_seed + seed), so the mean over seeds also averages over "
        "splits; the saved encoder and student are the first seed's.",
    )
    limit: int | None = Field(None, gt=0, description="Use a stratified random subset of this many rows (quick runs).")

    @model_validator(mode="after")
    def _source_needs(self) -> TabularDataConfig:
        if self.source in ("csv", "parquet", "arrays") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        if self.source in ("builtin", "hf") and not self.name:
            raise ValueError(f"source {self.source!r} needs `name`")
        both = sorted(set(self.categorical or ()) & set(self.numeric or ()))
        if both:
            raise ValueError(f"{', '.join(both)} listed as both categorical and numeric; keep one")
        return self

    @field_validator("name")
    @classmethod
    def _builtin_name(cls, name: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("source") == "builtin" and name is not None and name not in BUILTIN_TABLES:
            raise ValueError(
                f"unknown built-in table {name!r}{suggest(name, list(BUILTIN_TABLES))}; "
                f"expected one of: {', '.join(BUILTIN_TABLES)}"
            )
        return name


class TeacherMember(Section):
    """One teacher model: trained here from the config, or loaded from a skops file."""

    kind: str = Field(
        "gradient_boosting",
        description="random_forest, extra_trees, gradient_boosting, hist_gradient_boosting (scikit-learn), mlp "
        "(kdkit's MLP trained with kdkit's engine), or skops (a fitted scikit-learn model loaded from `path`).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Constructor arguments, checked against the model's signature (random_state is set by kdkit "
        "from the seed). For mlp: hidden, dropout, epochs, lr, batch_size, weight_decay.",
    )
    path: str | None = Field(
        None,
        description="The .skops file (kind: skops); never a pickle. A teacher fit on rows that land in this run's "
        "test split overstates its test accuracy (fidelity is unaffected).",
    )
    trusted: list[str] = Field(
        default_factory=list,
        description="Types in the skops file that skops does not trust by default and that you have reviewed "
        "(kind: skops); the error for an untrusted file lists them.",
    )
    input: Literal["encoded", "raw"] = Field(
        "encoded",
        description="What a skops model takes: encoded (kdkit's encoded matrix) or raw (a pandas DataFrame of the "
        "feature columns, for a Pipeline that does its own preprocessing).",
    )
    weight: float = Field(1.0, gt=0, description="Weight in the soft-voting average (normalised over members).")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in TEACHER_KINDS:
            raise ValueError(
                f"unknown teacher kind {kind!r}{suggest(kind, list(TEACHER_KINDS))}; "
                f"expected one of: {', '.join(TEACHER_KINDS)} (several members make a voting ensemble)"
            )
        return kind

    @model_validator(mode="after")
    def _skops_needs_path(self) -> TeacherMember:
        if self.kind == "skops" and not self.path:
            raise ValueError("a skops teacher needs `path` (a .skops file)")
        if self.kind != "skops" and (self.path or self.trusted):
            raise ValueError(f"`path` and `trusted` are for kind: skops, not {self.kind}")
        return self


class TabularTeacherConfig(Section):
    """The teacher: one model, or several whose class probabilities are averaged (soft voting)."""

    members: list[TeacherMember] = Field(
        default_factory=lambda: [TeacherMember()],
        min_length=1,
        description="One member is a single teacher; several form a soft-voting ensemble (weighted mean of their "
        "class probabilities).",
    )


class TreeConfig(Section):
    """A decision tree student. At least one size limit: an unlimited tree is not readable."""

    max_depth: int | None = Field(5, gt=0, description="Deepest path from the root to a leaf.")
    max_leaf_nodes: int | None = Field(None, ge=2, description="Most leaves (rules).")
    min_samples_leaf: int = Field(5, gt=0, description="Fewest training points (real + synthetic) in a leaf.")
    targets: Literal["soft", "hard"] = Field(
        "soft",
        description="soft: a regression tree on the teacher's class probabilities (each leaf holds the mean "
        "probability vector); hard: a classification tree on the teacher's top class.",
    )

    @model_validator(mode="after")
    def _limited(self) -> TreeConfig:
        if self.max_depth is None and self.max_leaf_nodes is None:
            raise ValueError("set max_depth or max_leaf_nodes; an unlimited tree is not readable")
        return self


class LogisticConfig(Section):
    """A sparse (L1) logistic regression student on standardised features."""

    C: float = Field(0.1, gt=0, description="Inverse L1 strength: smaller C, fewer non-zero coefficients.")
    max_iter: int = Field(3000, gt=0, description="Solver iterations (saga).")
    targets: Literal["soft", "hard"] = Field(
        "soft",
        description="soft: each point is repeated once per class, weighted by the teacher's probability; hard: the "
        "teacher's top class.",
    )


class StudentAutoConfig(Section):
    """No-regret distillation: per seed, the student's setting is chosen by cross-validation within the training
    split, the student on labels alone among the candidates (kdkit.interpret.auto)."""

    enabled: bool = Field(
        False,
        description="Per seed, score on validation folds of the training split (the test split is never seen) the "
        "student on labels alone, the configured setting and every pair of `points` × `targets`, and fit the best "
        "on the whole training split; ties go to the simpler (labels alone, then fewer points, then hard targets). "
        "The chosen student is never worse than labels alone on validation (kdkit train --auto).",
    )
    points: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 2000, 5000, 20000],
        min_length=1,
        description="Synthetic points (neighbourhood.points) to try; the configured number is always added.",
    )
    targets: list[Literal["soft", "hard"]] = Field(
        default_factory=lambda: ["hard", "soft"],
        min_length=1,
        description="Teacher targets to try (student.tree.targets or student.logistic.targets); the configured "
        "targets are always added.",
    )
    metric: Literal["accuracy", "f1_macro"] = Field(
        "accuracy",
        description="Validation metric of the choice, pooled over the folds. Not the log loss: a tree's pure leaves "
        "on labels say probability 0 for a class, so any hedging student (even one taught by a useless teacher) "
        "would beat labels alone on it.",
    )
    folds: int = Field(
        3,
        ge=2,
        le=20,
        description="Stratified folds of each seed's training split: the teacher and every candidate are fit on "
        "the other folds and scored on this one, so every training row is a validation row once (a single 20% split "
        "of a few hundred rows is too noisy to choose by).",
    )


class InterpretStudentConfig(Section):
    """The interpretable student; the same student is also fit on the labels alone, for comparison."""

    kind: Literal["decision_tree", "logistic_l1"] = Field("decision_tree", description="Which student.")
    tree: TreeConfig = Field(default_factory=TreeConfig, description="Settings of kind: decision_tree.")
    logistic: LogisticConfig = Field(default_factory=LogisticConfig, description="Settings of kind: logistic_l1.")
    auto: StudentAutoConfig = Field(
        default_factory=StudentAutoConfig,
        description="No-regret distillation: choose the neighbourhood size and targets per seed on validation.",
    )


class NeighbourhoodConfig(Section):
    """Synthetic points around the data, labelled by the teacher, so the student can follow it where rows are few."""

    points: int = Field(
        5000, ge=0, description="Synthetic training points added to the real training rows; 0: the rows alone."
    )
    method: Literal["perturb", "uniform"] = Field(
        "perturb",
        description="perturb: a random real row plus Gaussian noise of scale × the feature's std, clipped to the "
        "training range, each category resampled with probability category_resample; uniform: every feature drawn "
        "independently, numbers uniformly within the training range, categories by their training frequency.",
    )
    scale: float = Field(0.3, gt=0, description="Noise std as a fraction of each feature's std (perturb).")
    category_resample: float = Field(
        0.2, ge=0, le=1, description="Probability that a categorical value is redrawn from the observed levels."
    )
    eval_points: int = Field(
        2000,
        gt=0,
        description="Synthetic points drawn around the test rows (perturb, another seed) to measure fidelity off the "
        "data; never used for fitting.",
    )


class InterpretReportConfig(Section):
    """What the report says."""

    low_fidelity: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Below this agreement with the teacher the report and the CLI say plainly that "
        "the student does not explain the teacher.",
    )
    top_features: int = Field(15, gt=0, description="Features shown in the importance / coefficient chart.")
    plot_depth: int = Field(5, gt=0, description="Levels of the tree drawn in tree.png (rules.txt has all).")


class TabularEvalConfig(Section):
    """How the cost of each model is measured (kdkit.evaluate.cost, as for every task)."""

    batch_size: int = Field(256, gt=0, description="Rows per call of the throughput figure (test rows, repeated).")
    latency_repeats: int = Field(50, gt=0, description="Timed one-row predictions per model (median reported).")
    latency_warmup: int = Field(10, ge=0, description="Untimed one-row predictions before timing.")


class InterpretConfig(Section):
    """Distil a teacher on a table into an interpretable student and measure how faithful it is."""

    kind: Literal["interpret"] = Field(
        "interpret", description="Marks a tabular config (kdkit.tasks.task_of reads it to pick the tabular task)."
    )
    run: InterpretRunConfig = Field(default_factory=InterpretRunConfig, description="The run as a whole.")
    data: TabularDataConfig = Field(default_factory=TabularDataConfig, description="The table.")
    teacher: TabularTeacherConfig = Field(default_factory=TabularTeacherConfig, description="The teacher.")
    student: InterpretStudentConfig = Field(
        default_factory=InterpretStudentConfig, description="The interpretable student."
    )
    neighbourhood: NeighbourhoodConfig = Field(
        default_factory=NeighbourhoodConfig, description="Synthetic points labelled by the teacher."
    )
    eval: TabularEvalConfig = Field(default_factory=TabularEvalConfig, description="Cost measurement.")
    report: InterpretReportConfig = Field(default_factory=InterpretReportConfig, description="The report.")


# ---------------------------------------------------------------------------------------------------------------
# Loading (same contract as kdkit.config.load_config: YAML, dotted overrides, every problem in one ConfigError)


def interpret_config_from_dict(raw: Any, source: str = "config") -> InterpretConfig:
    """Validate a plain dict; every problem is listed in one ConfigError."""
    return validate_root(InterpretConfig, raw, source, "data, teacher, student, ...")


def load_interpret_config(path: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> InterpretConfig:
    """Read a YAML file (or take a dict), apply `--set key=value` overrides (to the resolved config, so that
    defaults not written in the YAML can be overridden too), and validate."""
    raw = dict(path) if isinstance(path, dict) else read_yaml(path)
    source = "config" if isinstance(path, dict) else str(path)
    return interpret_config_from_dict(apply_overrides(raw, overrides, InterpretConfig), source)


def dump_interpret_config(cfg: InterpretConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
