"""Interpretable students (scikit-learn) that learn from a teacher's soft labels, and how to read them.

decision_tree  a depth/leaf-limited tree. targets: soft fits a multi-output DecisionTreeRegressor on the teacher's
               class probabilities (squared error on probability vectors: with one-hot targets this is the Gini
               criterion, so it is the classification tree's split rule generalised to soft labels); each leaf
               predicts the mean probability vector of its points. targets: hard fits a DecisionTreeClassifier on
               the teacher's top class. Measured on breast cancer (gradient boosting teacher, depth 5, 5,000
               perturbed points, 10 splits, seeds 10-19), fidelity on test: soft 96.7% vs hard 96.4% (scale 0.3),
               96.2% vs 96.4% (scale 0.1); on the demo's 3 splits 97.4% vs 97.9%. No consistent winner (the gaps
               are below one test row). Soft is the default because its leaves keep how sure the teacher is, which
               the rules show (p=0.55 and p=0.99 are different statements).
logistic_l1    an L1 logistic regression on standardised features (coefficients per standard deviation of the
               feature; L1 sets most of them to zero). targets: soft repeats each point once per class with the
               teacher's probability as sample weight (the weighted log loss equals the cross-entropy to the soft
               label); hard fits the teacher's top class. Measured on the demo's setting (C=0.1, 3 splits):
               soft 96.97% fidelity / 95.80% accuracy vs hard 96.74% / 95.57% (labels alone 94.87%), so soft is
               the default.

Every student saves to JSON (student.json) with what is needed to predict without scikit-learn or pickle:
`predict_json(spec, x)` gives the same probabilities as the fitted model.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, export_text

from kdkit.errors import DataError


class TreeStudent:
    """A limited decision tree; see the module docstring for soft and hard targets. `model` is the fitted
    scikit-learn tree, or None for a tree read back from student.json (`from_json`), which predicts, sizes and
    ranks features the same way."""

    kind = "decision_tree"

    def __init__(
        self,
        n_classes: int,
        max_depth: int | None = 5,
        max_leaf_nodes: int | None = None,
        min_samples_leaf: int = 5,
        targets: str = "soft",
        random_state: int = 0,
    ):
        self.n_classes, self.targets = n_classes, targets
        self.limits = {"max_depth": max_depth, "max_leaf_nodes": max_leaf_nodes, "min_samples_leaf": min_samples_leaf}
        self.random_state = random_state
        self.model = None
        self._spec: dict | None = None
        self._arrays: dict | None = None  # compiled(spec), made at the first prediction

    @classmethod
    def from_json(cls, spec: dict) -> TreeStudent:
        student = cls(int(spec["n_classes"]), targets=spec.get("targets", "soft"))
        student._spec = spec
        return student

    def fit_teacher(self, x: np.ndarray, probs: np.ndarray) -> TreeStudent:
        """Fit on points labelled by the teacher (probs: (N, C) class probabilities)."""
        if self.targets == "soft":
            self.model = DecisionTreeRegressor(**self.limits, random_state=self.random_state).fit(x, probs)
        else:
            self.model = DecisionTreeClassifier(**self.limits, random_state=self.random_state).fit(
                x, probs.argmax(axis=1)
            )
        self._spec = self._arrays = None
        return self

    def fit_labels(self, x: np.ndarray, y: np.ndarray) -> TreeStudent:
        """The comparison: the same tree fit on the real labels alone."""
        self.model = DecisionTreeClassifier(**self.limits, random_state=self.random_state).fit(x, y)
        self._spec = self._arrays = None
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self._arrays is None:
            self._arrays = compiled(self.to_json())
        return predict_json(self._arrays, x)

    def size(self) -> dict:
        """Leaves, depth, and rules (leaves after merging subtrees that predict one class; see tree_rules)."""
        spec = self.to_json()
        left, right = spec["children_left"], spec["children_right"]
        depth = [0] * len(left)
        for node in range(len(left)):  # scikit-learn numbers a node before its children
            if left[node] != -1:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        return {
            "leaves": sum(1 for child in left if child == -1),
            "depth": max(depth),
            "rules": len(tree_rules(spec, None, [str(k) for k in range(self.n_classes)])),
        }

    def footprint(self) -> dict:
        """{"params": nodes, "size_mb": the arrays that predict (children, feature, threshold, values; 8 bytes
        each) / 1e6}: the same count as a teacher's trees (kdkit.interpret.teachers.estimator_footprint)."""
        spec = self.to_json()
        nodes = len(spec["children_left"])
        return {"params": nodes, "size_mb": tree_bytes(nodes, nodes * int(spec["n_classes"])) / 1e6}

    def importances(self) -> np.ndarray:
        """Impurity-based importance of each encoded feature (sums to 1; all 0 for a single leaf), as scikit-learn's
        feature_importances_ computes it, from the saved tree."""
        spec = self.to_json()
        if "impurity" not in spec:  # a student.json written before impurities were saved
            return np.asarray(self.model.feature_importances_, dtype=np.float64)
        left, right, feature = spec["children_left"], spec["children_right"], spec["feature"]
        impurity, samples = np.asarray(spec["impurity"]), np.asarray(spec["samples"], dtype=np.float64)
        out = np.zeros(int(spec["n_features"]))
        for node, (lo, hi) in enumerate(zip(left, right)):
            if lo != -1:
                out[feature[node]] += (
                    samples[node] * impurity[node] - samples[lo] * impurity[lo] - samples[hi] * impurity[hi]
                )
        total = out.sum()
        return out / total if total > 0 else out

    def to_json(self) -> dict:
        if self._spec is not None:
            return self._spec
        t = self.model.tree_
        value = np.asarray(t.value, dtype=np.float64)
        if isinstance(self.model, DecisionTreeRegressor):
            probs = value[:, :, 0]  # (nodes, C): the mean probability vector of the node's points
        else:
            probs = np.zeros((t.node_count, self.n_classes))
            probs[:, np.asarray(self.model.classes_, dtype=np.int64)] = value[:, 0, :]
        probs = np.clip(probs, 0.0, None)
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        self._spec = {
            "format": "kdkit.interpret_student/1",
            "kind": self.kind,
            "targets": self.targets,
            "n_classes": self.n_classes,
            "n_features": int(self.model.n_features_in_),
            "children_left": t.children_left.tolist(),
            "children_right": t.children_right.tolist(),
            "feature": t.feature.tolist(),
            "threshold": t.threshold.tolist(),
            "value": probs.round(6).tolist(),
            "samples": t.n_node_samples.tolist(),
            "impurity": t.impurity.tolist(),
        }
        return self._spec

    def outline(self, feature_names: list[str]) -> str | None:
        """scikit-learn's export_text of the fitted tree (values are class probabilities for targets: soft); None
        for a tree read back from JSON."""
        if self.model is None:
            return None
        return export_text(self.model, feature_names=list(feature_names), decimals=3, max_depth=50)


def tree_bytes(nodes: int, values: int) -> int:
    """Bytes of a tree's prediction arrays: per node two children, a feature and a threshold, plus its values."""
    return 8 * (4 * nodes + values)


class LogisticStudent:
    """L1 logistic regression on standardised features; see the module docstring. `model` is None for a student
    read back from student.json (`from_json`)."""

    kind = "logistic_l1"

    def __init__(
        self, n_classes: int, C: float = 0.1, max_iter: int = 3000, targets: str = "soft", random_state: int = 0
    ):
        self.n_classes, self.C, self.max_iter, self.targets = n_classes, C, max_iter, targets
        self.random_state = random_state
        self.converged = True
        self.model = None
        self._spec: dict | None = None
        self._arrays: dict | None = None  # compiled(spec), made at the first prediction

    @classmethod
    def from_json(cls, spec: dict) -> LogisticStudent:
        student = cls(int(spec["n_classes"]), targets=spec.get("targets", "soft"))
        student.converged = bool(spec.get("converged", True))
        student._spec = spec
        return student

    def fit_teacher(self, x: np.ndarray, probs: np.ndarray) -> LogisticStudent:
        if self.targets == "hard":
            return self._fit(x, probs.argmax(axis=1), None)
        n, c = probs.shape
        keep = probs.T.ravel() > 1e-6  # drop zero-weight copies: they change nothing and cost time
        return self._fit(np.tile(x, (c, 1))[keep], np.repeat(np.arange(c), n)[keep], probs.T.ravel()[keep])

    def fit_labels(self, x: np.ndarray, y: np.ndarray) -> LogisticStudent:
        return self._fit(x, y, None)

    def _fit(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> LogisticStudent:
        if len(np.unique(y)) < 2:
            raise DataError("student: every training point has the same class, so no classifier can be fit")
        self.mean_ = x.mean(axis=0)
        self.scale_ = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        self.model = LogisticRegression(
            C=self.C, solver="saga", max_iter=self.max_iter, random_state=self.random_state, **_l1()
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model.fit((x - self.mean_) / self.scale_, y, sample_weight=weight)
        self.converged = not any("converge" in str(w.message).lower() for w in caught)
        self._spec = self._arrays = None
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self._arrays is None:
            self._arrays = compiled(self.to_json())
        return predict_json(self._arrays, x)

    def size(self) -> dict:
        coef = np.asarray(self.to_json()["coef"])
        return {"nonzero": int((np.abs(coef) > 0).any(axis=0).sum()), "features": int(coef.shape[1])}

    def footprint(self) -> dict:
        """{"params": non-zero coefficients + intercepts, "size_mb": the arrays that predict (coefficients,
        intercepts, the standardisation's means and scales; 8 bytes each) / 1e6}."""
        spec = self.to_json()
        coef, intercept = np.asarray(spec["coef"]), np.asarray(spec["intercept"])
        values = coef.size + intercept.size + len(spec["mean"]) + len(spec["scale"])
        return {"params": int(np.count_nonzero(coef)) + int(intercept.size), "size_mb": 8 * values / 1e6}

    def importances(self) -> np.ndarray:
        """Largest |coefficient| of each feature over the classes (per standard deviation of the feature)."""
        return np.abs(np.asarray(self.to_json()["coef"])).max(axis=0)

    def to_json(self) -> dict:
        if self._spec is not None:
            return self._spec
        self._spec = {
            "format": "kdkit.interpret_student/1",
            "kind": self.kind,
            "targets": self.targets,
            "n_classes": self.n_classes,
            "classes": np.asarray(self.model.classes_).astype(int).tolist(),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "coef": np.asarray(self.model.coef_).tolist(),
            "intercept": np.asarray(self.model.intercept_).tolist(),
            "converged": self.converged,
        }
        return self._spec

    def outline(self, feature_names: list[str]) -> str | None:
        return None


def _l1() -> dict:
    """The L1 penalty in the spelling of the installed scikit-learn (1.8 deprecated `penalty` for `l1_ratio`)."""
    default = inspect.signature(LogisticRegression).parameters["penalty"].default
    return {"l1_ratio": 1.0} if default == "deprecated" else {"penalty": "l1"}


# name → student class; kdkit.interpret.config.STUDENT_KINDS lists the same names.
STUDENTS: dict[str, type] = {"decision_tree": TreeStudent, "logistic_l1": LogisticStudent}


def build_student(section, n_classes: int, seed: int):
    """A fresh student from the config's student section."""
    if section.kind == "decision_tree":
        t = section.tree
        return TreeStudent(n_classes, t.max_depth, t.max_leaf_nodes, t.min_samples_leaf, t.targets, seed)
    lg = section.logistic
    return LogisticStudent(n_classes, lg.C, lg.max_iter, lg.targets, seed)


def student_from_json(spec: dict):
    """A student read back from student.json (predicts, sizes and ranks features; `model` is None)."""
    if not isinstance(spec, dict) or spec.get("format") != "kdkit.interpret_student/1":
        raise DataError("student.json: not a kdkit interpretable student (format kdkit.interpret_student/1)")
    cls = STUDENTS.get(spec.get("kind"))
    if cls is None:
        raise DataError(
            f"student.json: unknown student kind {spec.get('kind')!r}; expected one of: {', '.join(STUDENTS)}"
        )
    return cls.from_json(spec)


def student_settings(section) -> str:
    """The student section in one line (report, metrics.json)."""
    if section.kind == "decision_tree":
        t = section.tree
        return (
            f"max_depth={t.max_depth}, max_leaf_nodes={t.max_leaf_nodes}, min_samples_leaf={t.min_samples_leaf}, "
            f"targets={t.targets}"
        )
    return f"C={section.logistic.C}, targets={section.logistic.targets}"


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


# ---------------------------------------------------------------------------------------------------------------
# Prediction from student.json (no scikit-learn object needed)


def compiled(spec: dict) -> dict:
    """The spec with its lists as numpy arrays: predict_json then converts nothing per call (what a fitted student
    keeps, so that its latency is that of the prediction, not of reading JSON lists)."""
    return {k: np.asarray(v) if isinstance(v, list) else v for k, v in spec.items()}


def predict_json(spec: dict, x: np.ndarray) -> np.ndarray:
    """Class probabilities (N, C) of a saved student (its spec, or `compiled(spec)`) for an encoded matrix x
    (N, D)."""
    x = np.asarray(x, dtype=np.float64)
    if spec.get("kind") == "decision_tree":
        return np.asarray(spec["value"], dtype=np.float64)[_leaf_of(spec, x)]
    if spec.get("kind") == "logistic_l1":
        z = (x - np.asarray(spec["mean"])) / np.asarray(spec["scale"])
        scores = z @ np.asarray(spec["coef"]).T + np.asarray(spec["intercept"])
        if scores.shape[1] == 1:  # binary: one score for the second class
            p1 = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            part = np.stack([1.0 - p1, p1], axis=1)
        else:
            scores = scores - scores.max(axis=1, keepdims=True)
            part = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
        out = np.zeros((len(x), int(spec["n_classes"])))
        out[:, np.asarray(spec["classes"], dtype=np.int64)] = part
        return out
    raise DataError(f"student.json: unknown student kind {spec.get('kind')!r}; expected decision_tree or logistic_l1")


# ---------------------------------------------------------------------------------------------------------------
# Reading a tree as rules


def tree_rules(spec: dict, encoder, class_names: list[str], x_real: np.ndarray | None = None) -> list[dict]:
    """The tree as IF … THEN rules, left to right: {"conditions": [text], "class", "probability", "samples",
    "rows"}.

    A subtree whose leaves all predict the same class becomes one rule (the predictions do not change; its
    probability is the mean over the subtree's fitting points), so a tree of 32 leaves may read as 12 rules.
    Conditions on the same column are merged (2 < age <= 40); one-hot columns read as `colour is red` /
    `colour is not red`, ordinal ones as `colour in {red, blue}`. samples counts the fitting points (real and
    synthetic) under the rule; rows counts the real rows of x_real (the training split), when given.
    """
    left, right = spec["children_left"], spec["children_right"]
    feature, threshold, value = spec["feature"], spec["threshold"], np.asarray(spec["value"])
    samples = np.asarray(spec["samples"])
    leaf_rows: dict[int, int] = {}
    if x_real is not None and len(x_real):
        leaves = _leaf_of(spec, x_real)
        leaf_rows = {int(k): int(v) for k, v in zip(*np.unique(leaves, return_counts=True))}

    def leaves_under(node: int) -> list[int]:
        return [node] if left[node] == -1 else leaves_under(left[node]) + leaves_under(right[node])

    rules: list[dict] = []

    def walk(node: int, bounds: dict) -> None:
        leaves = leaves_under(node)
        classes = {int(value[leaf].argmax()) for leaf in leaves}
        if len(classes) == 1:
            k = classes.pop()
            weight = samples[leaves] / samples[leaves].sum()
            rules.append(
                {
                    "conditions": _conditions(bounds, encoder),
                    "class": class_names[k],
                    "probability": float(weight @ value[leaves, k]),
                    "samples": int(samples[leaves].sum()),
                    "rows": sum(leaf_rows.get(leaf, 0) for leaf in leaves),
                }
            )
            return
        f, t = feature[node], threshold[node]
        walk(left[node], _narrow(bounds, f, t, "le", encoder))
        walk(right[node], _narrow(bounds, f, t, "gt", encoder))

    walk(0, {})
    return rules


def rules_text(rules: list[dict]) -> str:
    """IF … THEN … lines, one per rule."""
    lines = []
    for i, r in enumerate(rules, 1):
        cond = " AND ".join(r["conditions"]) or "always"
        lines.append(
            f"rule {i}: IF {cond} THEN {r['class']} (p={r['probability']:.2f}; {r['samples']} fitting points, "
            f"{r['rows']} training rows)"
        )
    return "\n".join(lines) + "\n"


def _leaf_of(spec: dict, x: np.ndarray) -> np.ndarray:
    left, right = np.asarray(spec["children_left"]), np.asarray(spec["children_right"])
    feature, threshold = np.asarray(spec["feature"]), np.asarray(spec["threshold"])
    node = np.zeros(len(x), dtype=np.int64)
    for _ in range(len(left)):
        inner = left[node] != -1
        if not inner.any():
            break
        idx = np.flatnonzero(inner)
        go_left = x[idx, feature[node[idx]]] <= threshold[node[idx]]
        node[idx] = np.where(go_left, left[node[idx]], right[node[idx]])
    return node


def _narrow(bounds: dict, f: int, t: float, side: str, encoder) -> dict:
    """The path's constraints after one more split: per encoded column, (low, high] for numbers and ordinal codes,
    True/False for a one-hot column."""
    out = dict(bounds)
    kind = encoder.describe_feature(f)[0] if encoder is not None else "numeric"
    if kind == "onehot":
        out[f] = side == "gt"
        return out
    low, high = out.get(f, (-np.inf, np.inf))
    out[f] = (low, min(high, t)) if side == "le" else (max(low, t), high)
    return out


def _conditions(bounds: dict, encoder) -> list[str]:
    texts = []
    for f in bounds:  # in path order: the root's condition first
        if encoder is None:
            kind, column, levels = "numeric", f"x{f}", None
        else:
            kind, column, levels = encoder.describe_feature(f)
        b = bounds[f]
        if kind == "onehot":
            texts.append(f"{column} is {levels}" if b else f"{column} is not {levels}")
        elif kind == "ordinal":
            low, high = b
            chosen = [lv for k, lv in enumerate(levels) if low < k <= high]
            unseen = " (or unseen)" if high == np.inf else ""
            texts.append(f"{column} in {{{', '.join(chosen)}}}{unseen}")
        else:
            low, high = b
            if low == -np.inf:
                texts.append(f"{column} <= {high:.4g}")
            elif high == np.inf:
                texts.append(f"{column} > {low:.4g}")
            else:
                texts.append(f"{low:.4g} < {column} <= {high:.4g}")
    return texts
