"""Which class score ranks an NCMI model's test slides best? Re-scores trained runs, no training.

    python benchmarks/ncmi_scores.py /tmp/ablation/runs/*/ncmi_default

For each run folder (every seed it holds), the test slides of ``seed_<s>/predictions_test.csv`` are
passed through the saved model once, and the macro one-vs-rest AUC of three scores of the same P is
printed, mean over seeds:
- ``per-class``: the Bayes score with each class's own spread s_k (what runs scored before the pooled
  score report: ``score_spread: class``);
- ``pooled``: the same score with one pooled spread for every class (``Scorer.map_log_scores``: what
  the information maps read, and what training, ``evaluate`` and the predictions CSV report since);
- ``-KL``: minus the divergence to each training class mean, the nearest-mean rule's ranking.
AUC ranks the float64 log scores per class, as the metrics do. Why it exists: the README's "NCMI's
centre and separation" section (iris's AUC).
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from wsi_ncmi.losses.ncmi import kl_matrix  # noqa: E402
from wsi_ncmi.store.h5 import read_feature_file  # noqa: E402
from wsi_ncmi.train.config import saved_config  # noqa: E402
from wsi_ncmi.train.inference import load_run_model  # noqa: E402


def macro_auc(y: np.ndarray, log_scores: torch.Tensor) -> float:
    s = log_scores.numpy()
    return float(np.mean([roc_auc_score(y == c, s[:, c]) for c in range(s.shape[1]) if 0 < (y == c).sum() < len(y)]))


def rescore(run: Path) -> dict[str, float]:
    features = Path(saved_config(run / "config.yaml").features)
    seeds = sorted(run.glob("seed_*/predictions_test.csv"))
    if not seeds:
        raise SystemExit(f"{run}: no seed_*/predictions_test.csv; pass a finished NCMI run folder")
    out: dict[str, list[float]] = {}
    for pred in seeds:
        rows = list(csv.DictReader(open(pred)))
        bags = [torch.from_numpy(read_feature_file(features / f"{r['slide_id']}.h5").features).float() for r in rows]
        rm = load_run_model(run, int(pred.parent.name.split("_")[1]), bags[0].shape[1])
        if rm.scorer.kind != "centroid":
            raise SystemExit(f"{run}: not an NCMI run (its scores are softmax); nothing to compare")
        rm.model.eval()
        with torch.no_grad():
            p = torch.cat([rm.scorer_inputs(rm.model(x[None]))[1] for x in bags]).double()
        y = np.array([rm.classes.index(r["label"]) if r["label"] in rm.classes else int(r["label"]) for r in rows])
        sc = rm.scorer
        for name, s in (("per-class", replace(sc, score_spread="class").log_scores(None, p)),
                        ("pooled", sc.map_log_scores(None, p)),
                        ("-KL", -kl_matrix(p, sc.qbar.double()))):
            out.setdefault(name, []).append(macro_auc(y, s))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="finished NCMI run folders")
    args = ap.parse_args()
    print("| run | per-class | pooled | -KL |\n|---|---|---|---|")
    for run in args.runs:
        r = rescore(run)
        print(f"| {run} | {r['per-class']:.3f} | {r['pooled']:.3f} | {r['-KL']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
