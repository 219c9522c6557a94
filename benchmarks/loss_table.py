"""Every loss on one feature cohort, several seeds, one table: the comparison NCMI must win.

    python benchmarks/loss_table.py                                     # generated bags, 5 seeds
    python benchmarks/loss_table.py --demo wsi-ncmi-demo                # the demo cohort's features
    python benchmarks/loss_table.py --task camelyon17 --labels stage_labels.csv --features features/

Losses: ce, weighted_ce, focal, label_smoothing, pc_softmax, mi, cmi_ce, ce+ncmi and NCMI in its
variants (logit / embedding space, alternating / fixed centroids). Each is trained with every seed,
the same aggregator, learning rate and schedule, model selection on validation; the table gives
test macro-F1, macro AUC and balanced accuracy as mean +/- std over seeds, and the NCMI of each
trained model's outputs on the test split. The generated cohort has CAMELYON-17's slide-level class
shares (318/36/59/87: negative / ITC / micro / macro by tumour-instance count), the imbalance the
prior-corrected losses are for. Both built-in cohorts run on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from wsi_ncmi.mil.synthetic import make_cohort
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_training

VARIANTS = {
    "ce": dict(loss="ce"),
    "weighted_ce": dict(loss="weighted_ce"),
    "focal": dict(loss="focal"),
    "label_smoothing": dict(loss="label_smoothing"),
    "pc_softmax": dict(loss="pc_softmax"),
    "mi": dict(loss="mi"),
    "cmi_ce": dict(loss="cmi_ce"),
    "ce+ncmi": dict(loss="ce+ncmi"),
    "ncmi (logit, alternating: default)": dict(loss="ncmi", ncmi_space="logit", ncmi_centroids="alternating"),
    "ncmi (logit, fixed)": dict(loss="ncmi", ncmi_space="logit", ncmi_centroids="fixed"),
    "ncmi (embedding, alternating)": dict(loss="ncmi", ncmi_space="embedding", ncmi_centroids="alternating"),
    "ncmi (embedding, fixed)": dict(loss="ncmi", ncmi_space="embedding", ncmi_centroids="fixed"),
}
CAMELYON17_SHARES = (318, 36, 59, 87)
COLUMNS = ("macro_f1", "auc", "balanced_accuracy", "ncmi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="a `wsi-ncmi demo` folder: use its features and stage_labels.csv")
    ap.add_argument("--labels")
    ap.add_argument("--features")
    ap.add_argument("--task", default="csv")
    ap.add_argument("--slides", type=int, default=160, help="generated cohort size (default 160)")
    ap.add_argument("--model", default="abmil")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--only", nargs="*", help="subset of variant names (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi-ncmi-losses-"))
    extra = {}
    if args.demo:
        demo = Path(args.demo)
        args.task, args.labels, args.features = "camelyon17", str(demo / "stage_labels.csv"), str(demo / "features")
        extra = dict(val_fraction=0.2)               # as the demo trains: ~2 validation slides per class
        source = f"demo cohort ({demo})"
    elif not args.features:
        cohort = make_cohort(work / "bags", n_slides=args.slides, dim=32, bag_size=(60, 160), separation=4.0,
                             proportions=CAMELYON17_SHARES)
        args.labels, args.features = str(cohort / "labels.csv"), str(cohort / "features")
        source = (f"generated bags ({args.slides} slides, CAMELYON-17 class shares, class by tumour-instance "
                  "count, 32-d)")
    else:
        source = args.features
    rows = []
    for name, kw in VARIANTS.items():
        if args.only and name not in args.only and kw["loss"] not in args.only:
            continue
        t0 = time.perf_counter()
        slug = "".join(c if c.isalnum() else "_" for c in name)
        cfg = TrainConfig(task=args.task, labels=args.labels, features=args.features, model=args.model,
                          out=str(work / "runs" / slug), seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                          device=args.device, progress=False, bootstrap=100, overwrite=True, **extra, **kw)
        with contextlib.redirect_stdout(io.StringIO()):
            agg = run_training(cfg)
        t = agg["test"]
        rows.append((name, t))
        print(f"{name:36s} " + "  ".join(f"{k} {t[k]['mean']:.3f} ± {t[k]['std']:.3f}" for k in COLUMNS)
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.model}, {args.seeds} seeds, {args.epochs} epochs, lr {args.lr}, {source}; test split")
    print("| loss | macro-F1 | macro AUC | balanced acc. | test NCMI |\n|---|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | " + " | ".join(f"{t[k]['mean']:.3f} ± {t[k]['std']:.3f}" for k in COLUMNS) + " |")


if __name__ == "__main__":
    main()
