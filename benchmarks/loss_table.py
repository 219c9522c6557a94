"""Every loss on one feature cohort, the same tuning budget, several seeds: the verdict on NCMI.

    python benchmarks/loss_table.py --workdir /tmp/lt                    # generated bags, every loss
    python benchmarks/loss_table.py --workdir /tmp/lt --only ce ncmi     # a subset (the table says so)
    python benchmarks/loss_table.py --workdir /tmp/lt --demo wsi-ncmi-demo
    python benchmarks/loss_table.py --workdir /tmp/lt --labels my.csv --features features/

The protocol (issue #12, "a fair verdict"):

1. **Same tuning budget.** Every loss gets exactly ``TRIALS`` (4) configurations, trained on the
   tuning seed (0) with the project's recipe (``select_metric``, ``min_epochs``, patience) and
   chosen on *validation* by that same criterion: the learning rate (the ``--lr auto`` grid) crossed
   with the loss's own knob (NCMI temperature, focal gamma, smoothing epsilon, MI weight, CMI
   lambda/beta, the CE+NCMI weight); a loss without a knob spends its four on a wider lr grid.
2. **Fresh seeds for the verdict.** The chosen configuration is retrained on seeds 1..S (S >= 5),
   so the tuning seed's luck never enters the test figures.
3. **Intervals.** Per loss: test macro-F1 and macro AUC, mean over seeds, with a 95% interval from
   a bootstrap over test slides of the seed-mean; beside them the calibration of the probabilities
   the predictions CSV holds, test ECE and Brier score (``train/metrics.py``), mean over seeds.
   Paired difference NCMI - CE: for each bootstrap draw of test slides, the mean over seeds of
   (NCMI seed s - CE seed s) on that draw; the interval therefore holds both the seed and the slide
   variation, paired on both.

The generated cohort has CAMELYON-17's slide-level class shares (318/36/59/87: negative / ITC /
micro / macro by tumour-instance count). Jobs are resumable: each finished training stays under
``--workdir/runs`` and is reused. Test metrics never feed a choice.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch is imported, or it has no effect

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from wsi_ncmi.losses.ncmi import default_temperature
from wsi_ncmi.mil.synthetic import CAMELYON17_LIKE_BAGS, make_cohort
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.compare import interval, paired_bootstrap, paired_difference, read_test_predictions
from wsi_ncmi.train.run import run_training
from wsi_ncmi.train.runfolder import saved_differences
from wsi_ncmi.train.trainer import selection_value

LR2 = (3e-4, 1e-3)
LR4 = (1e-4, 3e-4, 1e-3, 3e-3)
TRIALS = 4


def _cross(loss: str, knob: str, values) -> list[dict]:
    return [dict(loss=loss, lr=lr, **{knob: v}) for lr in LR2 for v in values]


def tuning(feature_norm: str) -> dict:
    """loss -> its TRIALS configurations. NCMI's temperature knob starts at what ``auto`` gives for the
    feature norm (0.03 with zscore, 0.3 with none) and tries 0.1 beside it."""
    t_auto = default_temperature("embedding", feature_norm == "zscore")
    return {
        "ce": [dict(loss="ce", lr=lr) for lr in LR4],
        "weighted_ce": [dict(loss="weighted_ce", lr=lr) for lr in LR4],
        "focal": _cross("focal", "focal_gamma", (1.0, 2.0)),
        "label_smoothing": _cross("label_smoothing", "label_smoothing", (0.05, 0.1)),
        "pc_softmax": [dict(loss="pc_softmax", lr=lr) for lr in LR4],
        "mi": _cross("mi", "mi_weight", (0.5, 1.0)),
        "cmi_ce": [dict(loss="cmi_ce", lr=lr, cmi_lambda=la, cmi_beta=be) for lr in LR2
                   for la, be in ((0.5, 0.1), (0.2, 0.05))],
        "ce+ncmi": _cross("ce+ncmi", "ncmi_weight", (0.5, 1.0)),
        "ncmi": _cross("ncmi", "ncmi_temperature", (t_auto, 0.1)),
    }


assert all(len(v) == TRIALS for norm in ("zscore", "none") for v in tuning(norm).values())


def _slug(kw: dict) -> str:
    return "_".join(f"{k}-{v:g}" if isinstance(v, float) else f"{k}-{v}" for k, v in sorted(kw.items())).replace("+", "p")


def _train(base: dict, kw: dict, seed: int, work: Path) -> Path:
    """Train one configuration for one seed (reused when already finished); returns its seed folder."""
    norm = base.get("feature_norm", "none")
    out = work / "runs" / (_slug(kw) + ("" if norm == "none" else f"_{norm}")) / f"s{seed}"
    sdir = out / f"seed_{seed}"
    cfg = TrainConfig(**base, **kw, out=str(out), seeds=1, seed=seed, progress=False, bootstrap=10,
                      overwrite=True)
    if (sdir / "metrics.json").exists():
        if not (stale := saved_differences(out, cfg)):
            return sdir
        print(f"{out}: trained with other settings ({', '.join(stale)}, e.g. by an older wsi-ncmi); training it "
              "again", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        run_training(cfg)
    return sdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="runs are kept here and reused (resumable)")
    ap.add_argument("--demo", help="a `wsi-ncmi demo` folder: use its features and stage_labels.csv")
    ap.add_argument("--labels")
    ap.add_argument("--features")
    ap.add_argument("--task", default="csv")
    ap.add_argument("--slides", type=int, default=160, help="generated cohort size (default 160)")
    ap.add_argument("--model", default="abmil")
    ap.add_argument("--seeds", type=int, default=5, help="verdict seeds, after the tuning seed (default 5)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--only", nargs="*", help="subset of losses (default: all)")
    ap.add_argument("--feature-norm", default=TrainConfig.feature_norm, choices=("none", "zscore"),
                    help=f"as `train --feature-norm`, for every loss alike (default {TrainConfig.feature_norm})")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    work = Path(args.workdir)
    extra = {}
    if args.demo:
        demo = Path(args.demo)
        args.task, args.labels, args.features = "camelyon17", str(demo / "stage_labels.csv"), str(demo / "features")
        extra = dict(val_fraction=0.2)               # as the demo trains
        source = f"demo cohort ({demo})"
    elif not args.features:
        if not (work / "bags" / "labels.csv").exists():
            make_cohort(work / "bags", n_slides=args.slides, **CAMELYON17_LIKE_BAGS)
        args.labels, args.features = str(work / "bags" / "labels.csv"), str(work / "bags" / "features")
        source = f"generated bags ({args.slides} slides, CAMELYON-17 class shares, class by tumour-instance count)"
    else:
        source = args.features
    base = dict(task=args.task, labels=args.labels, features=args.features, model=args.model, epochs=args.epochs,
                device=args.device, feature_norm=args.feature_norm, **extra)
    trials_of = tuning(args.feature_norm)
    losses = [k for k in trials_of if not args.only or k in args.only]
    chosen, members, calibration = {}, {}, {}
    for loss in losses:
        t0 = time.perf_counter()
        trials = []
        for kw in trials_of[loss]:
            sdir = _train(base, kw, 0, work)
            m = json.loads((sdir / "metrics.json").read_text())
            crit = TrainConfig().select_metric
            trials.append((selection_value(m["val"], crit), kw))
        best = max(trials, key=lambda t: (t[0], -t[1]["lr"]))[1]
        chosen[loss] = best
        seeds = [_train(base, best, s, work) for s in range(1, args.seeds + 1)]
        members[loss] = [read_test_predictions(sdir) for sdir in seeds]
        tests = [json.loads((sdir / "metrics.json").read_text())["test"] for sdir in seeds]
        calibration[loss] = [float(np.mean([m[k] for m in tests])) for k in ("ece", "brier")]
        knobs = {k: v for k, v in best.items() if k != "loss"}
        print(f"{loss:16s} chose {knobs} on validation  ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = paired_bootstrap(members, args.bootstrap)
    lo, hi = (lambda b: interval(b)[0]), (lambda b: interval(b)[1])
    print(f"\n{args.model}, {TRIALS} tuning trials per loss on seed 0 (validation, criterion "
          f"{TrainConfig().select_metric}), then seeds 1-{args.seeds}; at most {args.epochs} epochs; feature norm "
          f"{args.feature_norm}; {source}; "
          f"test split, seed-mean with 95% bootstrap interval over test slides\n")
    print("| loss | chosen on validation | macro-F1 | macro AUC | ECE | Brier |\n|---|---|---|---|---|---|")
    for loss in losses:
        pt, b = res[loss]
        knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen[loss].items()
                          if k != "loss")
        print(f"| {loss} | {knobs} | {pt[0]:.3f} [{lo(b)[0]:.3f}, {hi(b)[0]:.3f}] | "
              f"{pt[1]:.3f} [{lo(b)[1]:.3f}, {hi(b)[1]:.3f}] | {calibration[loss][0]:.3f} | {calibration[loss][1]:.3f} |")
    if "ncmi" in res and "ce" in res:
        d = paired_difference(res, "ncmi", "ce")
        print("\nNCMI - CE (paired over seeds and test slides): " + ", ".join(
            f"{name} {d[k][0]:+.3f} [{d[k][1]:+.3f}, {d[k][2]:+.3f}]" for k, name in (("macro_f1", "macro-F1"),
                                                                                 ("auc", "macro AUC"))))


if __name__ == "__main__":
    main()
