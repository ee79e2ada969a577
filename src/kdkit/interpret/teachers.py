"""Tabular teachers: scikit-learn models and ensembles trained from the config, kdkit's MLP trained with kdkit's
engine, or a fitted model loaded from a skops file (never a pickle). Several members form a soft-voting ensemble.

Every teacher answers `proba(num, cat)`: class probabilities (N, C) in the order of the encoder's class names, for
rows given as codes (see kdkit.interpret.tabular); it turns them into the encoded matrix, or into raw columns for a
loaded Pipeline that does its own preprocessing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)

from kdkit.errors import CompatibilityError, ConfigError, DataError
from kdkit.interpret.tabular import TabularEncoder
from kdkit.registry import bind, lookup


class MLPTeacher:
    """kdkit's MLP (kdkit.models.small.MLP) on standardised features, trained with cross-entropy by kdkit's engine.

    Imports torch only when fit, so that tree-ensemble runs stay torch-free.
    """

    def __init__(
        self,
        hidden: list[int] = (64, 64),
        dropout: float = 0.1,
        epochs: int = 60,
        lr: float = 3e-3,
        batch_size: int = 64,
        weight_decay: float = 1e-4,
        random_state: int = 0,
        device: str = "cpu",
    ):
        self.hidden, self.dropout, self.epochs, self.lr = list(hidden), float(dropout), int(epochs), float(lr)
        self.batch_size, self.weight_decay, self.random_state = int(batch_size), float(weight_decay), random_state
        self.device = device  # where it trains (run.device); it predicts on the CPU

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPTeacher:
        """y: class labels of any kind (ids or names); classes_ holds them sorted, as scikit-learn does."""
        import torch

        from kdkit.data.bundle import TensorData
        from kdkit.engine.loop import TrainOptions, train
        from kdkit.losses import build_loss
        from kdkit.models.small import MLP

        self.mean_, self.scale_ = x.mean(axis=0), np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        self.classes_, y = np.unique(y, return_inverse=True)
        torch.manual_seed(self.random_state)
        self.model_ = MLP((x.shape[1],), len(self.classes_), self.hidden, self.dropout)
        data = TensorData(torch.as_tensor(self._standardise(x)), torch.as_tensor(y, dtype=torch.long))
        opts = TrainOptions(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, keep_best="none"
        )
        train(
            self.model_,
            build_loss([("ce", 1.0, {})]),
            data,
            opts,
            seed=self.random_state,
            device=self.device,
            progress=False,
            log=lambda _: None,
            desc="mlp teacher",
        )
        self.model_.cpu().eval()
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model_(torch.as_tensor(self._standardise(x)))
        return logits.float().softmax(dim=1).numpy().astype(np.float64)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean_) / self.scale_).astype(np.float32)


# Teacher kinds that are trained here: name → estimator class (parameters bound against its signature).
TRAINED: dict[str, type] = {
    "random_forest": RandomForestClassifier,
    "extra_trees": ExtraTreesClassifier,
    "gradient_boosting": GradientBoostingClassifier,
    "hist_gradient_boosting": HistGradientBoostingClassifier,
    "mlp": MLPTeacher,
}


class Member:
    """One teacher model and how it reads rows: the encoded matrix, or raw columns (a loaded Pipeline)."""

    def __init__(self, estimator: Any, encoder: TabularEncoder, raw_input: bool = False, where: str = "teacher"):
        self.estimator, self.encoder, self.raw_input, self.where = estimator, encoder, raw_input, where
        self.columns: np.ndarray | None = None  # estimator's class → column of the probability matrix

    def fit(self, num: np.ndarray, cat: np.ndarray, y: np.ndarray) -> Member:
        """Fit on class names rather than ids, so that a saved teacher (teachers/member_<i>.skops) says which class
        each probability column is, and loads back into a later run through `align`."""
        self.estimator.fit(self._input(num, cat), np.asarray(self.encoder.class_names, dtype=object)[y])
        return self.align()

    def align(self) -> Member:
        """For a loaded model: match its classes_ to the table's class names (as text), or fail naming both."""
        names = self.encoder.class_names
        theirs = [str(c) for c in getattr(self.estimator, "classes_", [])]
        unknown = [c for c in theirs if c not in names]
        if not theirs or unknown:
            raise CompatibilityError(
                f"{self.where}: the model's classes {theirs} do not match the target's classes {names}; expected "
                "a model fit on the same target column"
            )
        self.columns = np.array([names.index(c) for c in theirs], dtype=np.int64)
        return self

    def proba(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        out = np.zeros((len(num), len(self.encoder.class_names)))
        out[:, self.columns] = self.estimator.predict_proba(self._input(num, cat))
        return out

    def _input(self, num: np.ndarray, cat: np.ndarray):
        return self.encoder.frame(num, cat) if self.raw_input else self.encoder.matrix(num, cat)


class TabularTeacher:
    """The teacher: the weighted mean of its members' class probabilities (soft voting); one member is itself."""

    def __init__(self, members: list[Member], weights: list[float]):
        self.members = members
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))

    def fit(self, num: np.ndarray, cat: np.ndarray, y: np.ndarray, trained: list[bool]) -> TabularTeacher:
        for member, train_it in zip(self.members, trained):
            if train_it:
                member.fit(num, cat, y)
        return self

    def proba(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        return sum(w * m.proba(num, cat) for w, m in zip(self.weights, self.members))

    def footprint(self) -> dict:
        """{"params", "size_mb", "members"}: estimator_footprint summed over the members."""
        sizes = [estimator_footprint(m.estimator) for m in self.members]
        return {
            "params": sum(p for p, _ in sizes),
            "size_mb": sum(b for _, b in sizes) / 1e6,
            "members": len(self.members),
        }


def estimator_footprint(estimator: Any) -> tuple[int, int]:
    """(parameters, bytes) of a fitted model, counted as for the students (kdkit.interpret.students): a tree's
    parameters are its nodes and its bytes those of its prediction arrays (students.tree_bytes); an ensemble sums
    its trees; kdkit's MLP counts its torch parameters and buffers; a Pipeline sums its steps; any other model
    counts the numbers in its fitted arrays (attributes ending in `_`)."""
    from sklearn.pipeline import Pipeline

    from kdkit.interpret.students import tree_bytes

    if isinstance(estimator, MLPTeacher):
        from kdkit.evaluate.latency import footprint

        size = footprint(estimator.model_)
        return size["params"], round(size["size_mb"] * 1e6)
    if isinstance(estimator, Pipeline):
        sizes = [estimator_footprint(step) for _, step in estimator.steps if step not in (None, "passthrough")]
        return sum(p for p, _ in sizes), sum(b for _, b in sizes)
    tree = getattr(estimator, "tree_", None)
    if tree is not None:  # a decision tree
        return int(tree.node_count), tree_bytes(int(tree.node_count), int(tree.value.size))
    trees = getattr(estimator, "estimators_", None)
    if trees is not None:  # forests (a list), gradient boosting (an array: stages × classes)
        sizes = [estimator_footprint(t) for t in np.asarray(trees, dtype=object).ravel()]
        return sum(p for p, _ in sizes), sum(b for _, b in sizes)
    predictors = getattr(estimator, "_predictors", None)
    if predictors is not None:  # histogram gradient boosting: its own compact node arrays
        nodes = [p.nodes for stage in predictors for p in stage]
        return sum(len(n) for n in nodes), sum(int(n.nbytes) for n in nodes)
    arrays = [
        v
        for k, v in vars(estimator).items()
        if k.endswith("_") and isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.number)
    ]
    return sum(int(a.size) for a in arrays), sum(int(a.nbytes) for a in arrays)


def check_teacher(section) -> None:
    """Check every member's kind and parameters against the estimator's signature, without fitting anything."""
    for i, m in enumerate(section.members):
        where = f"teacher.members.{i}"
        cls = lookup(TEACHERS, m.kind, f"{where}.kind")
        if m.kind in TRAINED:
            bind(cls.__init__, m.params, f"{where}.params", provided=_provided(cls))
        elif m.params:
            raise ConfigError(f"{where}.params: a skops teacher is loaded fitted; it takes no params")


def build_teacher(
    section, encoder: TabularEncoder, seed: int, device: str = "cpu"
) -> tuple[TabularTeacher, list[bool]]:
    """The (unfitted where trained here) teacher and, per member, whether it must be fit on the training rows.
    device: where a member trained with torch (mlp) trains."""
    check_teacher(section)
    members, trained = [], []
    for i, m in enumerate(section.members):
        where = f"teacher.members.{i}"
        if m.kind in TRAINED:
            cls = TRAINED[m.kind]
            given = {"random_state": seed, "device": device}
            members.append(Member(cls(**m.params, **{k: given[k] for k in _provided(cls)}), encoder, where=where))
            trained.append(True)
        else:
            estimator = load_skops(m.path, m.trusted, where)
            members.append(Member(estimator, encoder, raw_input=m.input == "raw", where=where).align())
            trained.append(False)
    return TabularTeacher(members, [m.weight for m in section.members]), trained


def _provided(cls: type) -> tuple[str, ...]:
    """The constructor arguments kdkit sets itself (the seed; an mlp's device), never the config."""
    parameters = inspect.signature(cls.__init__).parameters
    return tuple(name for name in ("random_state", "device") if name in parameters)


# ---------------------------------------------------------------------------------------------------------------
# skops


def _skops_io():
    try:
        import skops.io as sio
    except ImportError:
        raise ConfigError(
            "teacher: loading a fitted model needs the skops package: pip install skops (or pip install "
            "'kdkit[interpret]'); kdkit never loads plain pickles"
        ) from None
    return sio


def have_skops() -> bool:
    try:
        import skops.io  # noqa: F401
    except ImportError:
        return False
    return True


def load_skops(path: str | Path, trusted: list[str] = (), where: str = "teacher") -> Any:
    """A fitted scikit-learn model from a .skops file. Types that skops does not trust by default must be listed in
    `trusted` (after review); the error names them."""
    sio = _skops_io()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{where}.path: file {str(p)!r} not found")
    try:
        untrusted = sio.get_untrusted_types(file=p)
    except Exception as exc:
        raise DataError(f"{where}.path: {p.name} is not a skops file: {exc}".splitlines()[0]) from None
    unreviewed = [t for t in untrusted if t not in set(trusted)]
    if unreviewed:
        raise ConfigError(
            f"{where}.trusted: {p.name} holds types that skops does not trust by default: {', '.join(unreviewed)}; "
            f"review them and list them in {where}.trusted to load the file"
        )
    model = sio.load(p, trusted=list(untrusted))
    if not hasattr(model, "predict_proba") or not hasattr(model, "classes_"):
        raise CompatibilityError(
            f"{where}.path: {p.name} holds a {type(model).__name__}; expected a fitted classifier with predict_proba"
        )
    return model


def save_skops(model: Any, path: str | Path) -> Path:
    """Write a fitted scikit-learn model as .skops (atomically)."""
    from kdkit.atomic import write_bytes

    return write_bytes(path, _skops_io().dumps(model))


# Every kind a teacher member may have (kdkit.interpret.config.TEACHER_KINDS lists the same names): the kinds
# trained here, and skops, a fitted model loaded from a file.
TEACHERS: dict[str, Callable[..., Any]] = {**TRAINED, "skops": load_skops}
