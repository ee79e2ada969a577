"""Quality metrics for classifiers, and how to summarise them over seeds.

Every function takes logits as they come out of a model (any float dtype, any device) and upcasts to fp32 on the
CPU first: a softmax in bf16 rounds confidences to 2–3 significant digits, which is enough to move samples between
calibration bins. Scores come back as plain Python floats so they go straight into metrics.json.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference_logits: torch.Tensor | None = None,
    ece_bins: int = 15,
) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, agreement, ECE and NLL of one model on one data set.

    logits: (N, C) any float dtype; labels: (N,) int64 in [0, C); reference_logits: (N, C) of another model (the
    teacher), or None.

    Returns floats under these keys:
      accuracy                            fraction of top-1 predictions equal to the label.
      precision_macro, recall_macro,      scikit-learn macro averages over all C classes (labels=range(C)), so a
      f1_macro                            class that is never predicted, or absent from `labels`, counts as 0
                                          (zero_division=0) rather than being left out of the mean.
      agreement                           fraction of samples where the top-1 class equals the reference's top-1
                                          class; NaN when reference_logits is None (there is nothing to agree with).
      ece                                 expected calibration error of the top-1 confidence: torchmetrics
                                          MulticlassCalibrationError with the l1 norm and `ece_bins` equal-width bins.
      nll                                 mean negative log-likelihood of the labels (cross-entropy, natural log).
    """
    logits, labels = _checked(logits, labels)
    num_classes = logits.shape[1]
    predicted = logits.argmax(dim=1)
    y_true, y_pred = labels.numpy(), predicted.numpy()

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0
    )
    # Imported here: torchmetrics loads all its domains (text, audio, ...) on import, which takes seconds, and
    # every CLI verb that imports the pipeline would pay for it even when it evaluates nothing.
    from torchmetrics.functional.classification import multiclass_calibration_error

    # Probabilities, not logits: torchmetrics treats inputs that all lie in [0, 1] as probabilities already, so
    # logits that happen to lie in [0, 1] would silently skip the softmax.
    probs = logits.softmax(dim=1)
    ece = multiclass_calibration_error(probs, labels, num_classes=num_classes, n_bins=ece_bins, norm="l1")

    if reference_logits is None:
        agreement = math.nan
    else:
        reference, _ = _checked(reference_logits, labels)
        if reference.shape != logits.shape:
            raise ValueError(f"reference_logits has shape {tuple(reference.shape)}, expected {tuple(logits.shape)}")
        agreement = (reference.argmax(dim=1) == predicted).float().mean().item()

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "agreement": float(agreement),
        "ece": float(ece.item()),
        "nll": float(F.cross_entropy(logits, labels).item()),
    }


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class (scikit-learn's layout), all C classes."""
    logits, labels = _checked(logits, labels)
    predicted = logits.argmax(dim=1)
    return confusion_matrix(labels.numpy(), predicted.numpy(), labels=list(range(num_classes)))


def reliability(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """The data of a reliability diagram: top-1 confidence against accuracy, per equal-width confidence bin.

    Bin i holds the samples whose top-1 probability lies in [i/n_bins, (i+1)/n_bins); a confidence of exactly 1.0
    goes into the last bin. Returns {"confidence": [...], "accuracy": [...], "count": [...]}: per non-empty bin, in
    increasing order of confidence, the mean confidence, the fraction correct, and the number of samples. Empty
    bins are left out (they have no mean), so the lists may be shorter than n_bins.
    Σ count/N · |accuracy − confidence| over the bins is the l1 ECE.
    """
    logits, labels = _checked(logits, labels)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    # Same rule as torchmetrics (bucketize, right=True) so that these bins are the ones behind `ece`.
    bin_index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)

    curve: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for i in range(n_bins):
        in_bin = bin_index == i
        count = int(in_bin.sum().item())
        if count == 0:
            continue
        curve["confidence"].append(confidence[in_bin].mean().item())
        curve["accuracy"].append(correct[in_bin].mean().item())
        curve["count"].append(count)
    return curve


def summarize_seeds(per_seed: list[dict[str, float]]) -> dict:
    """Mean and spread of per-seed metrics.

    Returns {key: mean, ..., "std": {key: population std (ddof=0)}, "per_seed": per_seed, "n_seeds": n} for every
    key whose value is a real number (int, float or numpy scalar; not bool) in every seed's dict; other keys stay
    only in "per_seed".
    A NaN in any seed makes that key's mean and std NaN. One seed gives std 0.0.
    """
    if not per_seed:
        raise ValueError("summarize_seeds needs at least one seed's metrics")
    numeric = [key for key in per_seed[0] if all(_is_number(seed.get(key)) for seed in per_seed)]
    columns = {key: np.array([float(seed[key]) for seed in per_seed]) for key in numeric}
    summary: dict = {key: float(values.mean()) for key, values in columns.items()}
    summary["std"] = {key: float(values.std(ddof=0)) for key, values in columns.items()}
    summary["per_seed"] = list(per_seed)
    summary["n_seeds"] = len(per_seed)
    return summary


def gain(student: list[dict], baseline: list[dict], keys=("accuracy", "f1_macro", "ece")) -> dict:
    """What distillation bought: paired differences student − baseline, seed by seed.

    student[i] and baseline[i] are the metrics of the distilled and the plainly trained student with the same seed
    (same initialisation and data order), so the difference removes the seed's own luck. Returns, per key,
    {"mean": mean of the differences, "std": their population std (ddof=0), "n": number of pairs}. For ece a
    negative mean is an improvement. Raises ValueError when the two lists differ in length.
    """
    if len(student) != len(baseline):
        raise ValueError(f"gain pairs seeds by position: {len(student)} student runs but {len(baseline)} baselines")
    if not student:
        raise ValueError("gain needs at least one seed")
    result = {}
    for key in keys:
        differences = np.array([float(s[key]) - float(b[key]) for s, b in zip(student, baseline, strict=True)])
        result[key] = {"mean": float(differences.mean()), "std": float(differences.std(ddof=0)), "n": len(differences)}
    return result


def _checked(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached fp32 CPU logits (N, C) and int64 CPU labels (N,), or a ValueError naming the bad shape."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (N,) with N={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero samples")
    return logits.detach().float().cpu(), labels.detach().long().cpu()


def _is_number(value: object) -> bool:
    # numbers.Real covers numpy scalars too; bool is an int subclass but is not a measurement to average.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
