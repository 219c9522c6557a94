"""Two losses compared on the same test slides: seed-mean metrics and the paired difference.

Why a paired bootstrap: the losses are trained with the same seeds and tested on the same slides,
so their errors are correlated; the interval of the difference must keep that pairing. For each
bootstrap draw of test slides, every seed of every loss is scored on that draw, the seeds are
averaged per loss, and the difference is taken. The interval therefore holds both the seed and the
slide variation (Efron & Tibshirani 1993, ch. 6). Used by ``wsi-ncmi demo`` and
``benchmarks/loss_table.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from wsi_ncmi.train.metrics import resample_metrics

METRICS = ("macro_f1", "auc")   # the first two of metrics.RESAMPLED


def read_test_predictions(seed_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(slide ids, labels, predictions, (N, C) float64 log scores) of ``predictions_test.csv``, sorted
    by id. Log scores, not probabilities: they rank what underflows to p = 0 (``read_scores``)."""
    from wsi_ncmi.train.run import read_scores

    with open(Path(seed_dir) / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    C = sum(1 for k in rows[0] if k.startswith("p_"))
    ids = [r["slide_id"] for r in rows]
    y = np.array([int(r["label"]) for r in rows])
    pred = np.array([int(r["pred"]) for r in rows])
    p = np.array([read_scores(r, C)[1] for r in rows], dtype=np.float64)
    order = np.argsort(ids)
    return [ids[i] for i in order], y[order], pred[order], p[order]


def paired_bootstrap(members: dict[str, list[tuple]], n: int = 1000, seed: int = 0) -> dict:
    """``members``: loss -> one ``read_test_predictions`` tuple per seed, all on the same slides (the
    scores only rank, so log scores or probabilities serve alike).

    Returns loss -> (point, draws): the seed-mean (macro-F1, AUC) and its (n, 2) bootstrap draws;
    every loss is scored on the same draws, so differences of draws are paired.
    """
    runs0 = next(iter(members.values()))
    ids = runs0[0][0]
    for loss, runs in members.items():
        for r in runs:
            if r[0] != ids:
                raise ValueError(f"{loss}: its runs test other slides than {next(iter(members))}'s; "
                                 "a paired comparison needs the same test slides")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(ids), len(ids)) for _ in range(n)]
    out = {}
    for loss, runs in members.items():
        point = np.mean([resample_metrics(y, pr, p)[:2] for _, y, pr, p in runs], 0)
        boot = np.array([np.mean([resample_metrics(y[i], pr[i], p[i])[:2] for _, y, pr, p in runs], 0) for i in draws])
        out[loss] = (point, boot)
    return out


def interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval of bootstrap draws (per column, NaN draws ignored)."""
    return np.nanquantile(draws, 0.025, 0), np.nanquantile(draws, 0.975, 0)


def paired_difference(res: dict, a: str, b: str) -> dict:
    """``a`` - ``b`` per metric: point and 95% interval, from ``paired_bootstrap``'s output."""
    d_pt = res[a][0] - res[b][0]
    lo, hi = interval(res[a][1] - res[b][1])
    return {k: (float(d_pt[i]), float(lo[i]), float(hi[i])) for i, k in enumerate(METRICS)}
