"""Classification metrics, as scikit-learn defines them.

Macro-F1 is sklearn's ``average="macro"`` (several MIL papers report torchmetrics' default, which
is micro-F1, i.e. accuracy), over the classes present in the labels or the predictions: a class with
no slide in a split and never predicted there is left out rather than counted as F1 = 0 (the run
warns when a split lacks a class; a class predicted but absent still counts, with F1 = 0). AUC is macro one-vs-rest over the classes present with both positives
and negatives, ranked on float64 log scores where the caller has them (a probability that exp()
saturated to 0 or 1 ties slides the log score still orders). Calibration: ECE (15 equal-width bins
of top-label confidence, Guo et al. 2017, arXiv:1706.04599), the multi-class Brier score (mean over
slides of sum_k (p_k - 1[y = k])^2; 0 perfect, 2 worst) and the NLL of the true class. Bootstrap
CIs resample slides with replacement.
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


def calibration(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """ECE (top-label, equal-width bins) and multi-class Brier score of class probabilities."""
    conf, top = probs.max(1), probs.argmax(1)
    correct = (top == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = sum(abs(correct[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
              for b in range(bins) if (idx == b).any())
    onehot = np.eye(probs.shape[1])[y]
    return {"ece": float(ece), "brier": float(((probs - onehot) ** 2).sum(1).mean())}


def classification_metrics(y, pred, scores, num_classes: int, log_scores=None) -> dict:
    """``scores``: class probabilities; ``log_scores`` (optional, float64): their logs, used to rank (AUC)
    and for the NLL. Small splits and bootstrap resamples can miss a class; sklearn's warnings about
    that are muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs = None if log_scores is None else np.asarray(log_scores, dtype=np.float64)
        return _metrics(np.asarray(y), np.asarray(pred), np.asarray(scores, dtype=np.float64), num_classes, logs)


def macro_f1(y, pred) -> float:
    """Macro-F1 over the classes present in ``y`` or ``pred`` (a class absent from both is no error)."""
    y, pred = np.asarray(y), np.asarray(pred)
    labels = sorted(set(y.tolist()) | set(pred.tolist()))
    return float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))


def _metrics(y, pred, scores, num_classes: int, logs=None) -> dict:
    labels = list(range(num_classes))
    rank = logs if logs is not None else scores
    nll = -logs[np.arange(len(y)), y] if logs is not None else -np.log(np.clip(scores[np.arange(len(y)), y], 1e-300, None))
    return {
        "n": int(len(y)),
        "macro_f1": macro_f1(y, pred),
        "auc": macro_auc(y, rank),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "accuracy": float(accuracy_score(y, pred)),
        "per_class_f1": [float(v) for v in f1_score(y, pred, average=None, labels=labels, zero_division=0)],
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        **calibration(y, scores),
        "nll": float(nll.mean()) if len(y) else float("nan"),
    }


#: the metrics a bootstrap resample is scored on (``resample_metrics``)
RESAMPLED = ("macro_f1", "auc", "balanced_accuracy", "accuracy")


def resample_metrics(y: np.ndarray, pred: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``RESAMPLED`` (macro-F1, macro AUC, balanced accuracy, accuracy) exactly as
    ``classification_metrics`` defines them, without the rest.

    Why: a bootstrap scores hundreds or thousands of resamples; the full metrics (calibration,
    confusion, sklearn's input validation) cost about 11 ms each on a CPU core, this about 0.3 ms
    (a run's test CIs took 6 s per seed before). Macro-F1 averages over the classes present in labels
    or predictions; macro AUC averages one-vs-rest AUCs over the classes with both positives and
    negatives, each the Mann-Whitney statistic with ties counted half (sklearn's trapezoidal ROC AUC);
    balanced accuracy averages recall over the classes present in the labels. ``rank``: (N, C)
    scores, probabilities or their logs alike (only their order counts).
    """
    from scipy.stats import rankdata

    f1 = []
    for k in np.union1d(y, pred):
        tp = np.sum((y == k) & (pred == k))
        f1.append(2 * tp / (np.sum(y == k) + np.sum(pred == k)))
    aucs = []
    for k in range(rank.shape[1]):
        pos = y == k
        n1 = int(pos.sum())
        if 0 < n1 < len(y):
            r = rankdata(rank[:, k])
            aucs.append((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))
    if rank.shape[1] == 2:   # binary: the AUC of the positive class, as macro_auc
        aucs = aucs[1:] if len(aucs) == 2 else []
    recall = [np.mean(pred[y == k] == k) for k in np.unique(y)]
    return np.array([np.mean(f1), np.mean(aucs) if aucs else np.nan, np.mean(recall), np.mean(y == pred)])


def bootstrap_ci(y, pred, scores, num_classes: int, n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 log_scores=None) -> dict:
    """Percentile bootstrap (1 - alpha) intervals for macro-F1, AUC, balanced accuracy and accuracy
    (``RESAMPLED``); AUC ranks the float64 log scores where given. ``num_classes`` is kept for
    callers' symmetry with ``classification_metrics``: the resampled metrics need only the columns."""
    y, pred = np.asarray(y), np.asarray(pred)
    rank = np.asarray(scores, dtype=np.float64) if log_scores is None else np.asarray(log_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in RESAMPLED}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for k, v in zip(RESAMPLED, resample_metrics(y[idx], pred[idx], rank[idx])):
            if np.isfinite(v):
                draws[k].append(float(v))
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
