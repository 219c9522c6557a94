"""Classification metrics, as scikit-learn defines them.

Macro-F1 is sklearn's ``average="macro"`` (several MIL papers report torchmetrics' default, which
is micro-F1, i.e. accuracy), over the classes present in the labels or the predictions: a class with
no slide in a split and never predicted there is left out rather than counted as F1 = 0 (the run
warns when a split lacks a class; a class predicted but absent still counts, with F1 = 0). AUC is macro one-vs-rest over the classes present with both positives
and negatives. Bootstrap CIs resample slides with replacement.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix, f1_score,
                             roc_auc_score)


def macro_auc(y: np.ndarray, scores: np.ndarray) -> float:
    c = scores.shape[1]
    if c == 2:
        return float(roc_auc_score(y, scores[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    aucs = [roc_auc_score(y == k, scores[:, k]) for k in range(c) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_metrics(y, pred, scores, num_classes: int) -> dict:
    """Small splits and bootstrap resamples can miss a class; sklearn's warnings about that are muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _metrics(np.asarray(y), np.asarray(pred), np.asarray(scores, dtype=np.float64), num_classes)


def _metrics(y, pred, scores, num_classes: int) -> dict:
    labels = list(range(num_classes))
    return {
        "n": int(len(y)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=sorted(set(y.tolist()) | set(pred.tolist())),
                                   zero_division=0)),
        "auc": macro_auc(y, scores),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float(accuracy_score(y, pred)),
        "per_class_f1": [float(v) for v in f1_score(y, pred, average=None, labels=labels, zero_division=0)],
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def bootstrap_ci(y, pred, scores, num_classes: int, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap (1 - alpha) intervals for macro-F1, AUC, balanced accuracy and accuracy."""
    y, pred, scores = np.asarray(y), np.asarray(pred), np.asarray(scores)
    rng = np.random.default_rng(seed)
    keys = ("macro_f1", "auc", "balanced_accuracy", "accuracy")
    draws = {k: [] for k in keys}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        m = classification_metrics(y[idx], pred[idx], scores[idx], num_classes)
        for k in keys:
            if np.isfinite(m[k]):
                draws[k].append(m[k])
    return {k: [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] if v else [float("nan")] * 2
            for k, v in draws.items()}


def quadratic_kappa(a, b) -> float:
    """Quadratic-weighted kappa; NaN when undefined (e.g. every patient has the same stage)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(a, b, weights="quadratic"))


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
