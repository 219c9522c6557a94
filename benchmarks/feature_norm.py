"""Does standardising the instance features help, and which loss? ``--feature-norm none`` vs ``zscore``.

    python benchmarks/feature_norm.py --workdir /tmp/fn --demo wsi-ncmi-demo    # + the demo's features
    python benchmarks/feature_norm.py --workdir /tmp/fn                         # measurement cohorts only

Cohorts: the three measurement cohorts of ``benchmarks/recipe.py`` (``make_measurement_cohort`` on
scikit-learn's digits, breast_cancer and wine: real rows, unscaled, plain CLAM-style HDF5), and with
``--demo`` the real-H&E features of a ``wsi-ncmi demo`` folder (whose micro and macro test slides also
give the CE and NCMI lesion AP). Every cell is the default recipe with only ``--feature-norm``
changed, ``--seeds`` seeds (3), gated ABMIL; test macro-F1 and macro AUC, mean +/- std over seeds, and
the paired NCMI - CE difference per setting (paired over seeds and test slides, 95% bootstrap
interval). Nothing is tuned: the question is what the setting does at the defaults, for every loss
alike. Finished trainings under ``--workdir/runs`` are reused.
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

from wsi_ncmi.mil.synthetic import make_measurement_cohort
from wsi_ncmi.train.compare import paired_bootstrap, paired_difference, read_test_predictions
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_training

MEASUREMENT = ("digits", "breast_cancer", "wine")
LOSSES = ("ce", "ncmi")
NORMS = ("none", "zscore")


def _train(cohort: dict, loss: str, norm: str, seeds: int, work: Path) -> Path:
    out = work / "runs" / cohort["name"] / f"{loss}_{norm}"
    if not all((out / f"seed_{s}" / "metrics.json").is_file() for s in range(seeds)):   # resume adds seeds
        cfg = TrainConfig(task=cohort["task"], labels=cohort["labels"], features=cohort["features"], out=str(out),
                          loss=loss, feature_norm=norm, seeds=seeds, resume=True, progress=False, bootstrap=100,
                          **cohort.get("extra", {}))
        with contextlib.redirect_stdout(io.StringIO()):
            run_training(cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="cohorts and runs are kept here and reused")
    ap.add_argument("--demo", help="a `wsi-ncmi demo` folder: also its features (and lesion AP)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    work = Path(args.workdir)
    cohorts = []
    if args.demo:
        demo = Path(args.demo)
        cohorts.append(dict(name="demo", task="camelyon17", labels=str(demo / "stage_labels.csv"),
                            features=str(demo / "features"), extra=dict(val_fraction=0.2), demo=demo))
    for ds in MEASUREMENT:
        root = work / "cohorts" / ds
        if not (root / "labels.csv").is_file():
            make_measurement_cohort(root, dataset=ds, seed=0)
        cohorts.append(dict(name=ds, task="csv", labels=str(root / "labels.csv"), features=str(root / "features")))
    rows, diffs, lesion = [], [], {}
    for c in cohorts:
        for norm in NORMS:
            members = {}
            for loss in LOSSES:
                t0 = time.perf_counter()
                run = _train(c, loss, norm, args.seeds, work)
                te = json.loads((run / "metrics.json").read_text())["test"]
                rows.append((c["name"], loss, norm, te["macro_f1"], te["auc"]))
                members[loss] = [read_test_predictions(run / f"seed_{s}") for s in range(args.seeds)]
                if "demo" in c:
                    from wsi_ncmi.demo.lesions import lesion_ap

                    plan = json.loads((c["demo"] / "lesions.json").read_text())
                    lesion[(loss, norm)] = lesion_ap(run, c["features"], plan)
                print(f"{c['name']:14s} {loss:5s} {norm:7s} macro-F1 {te['macro_f1']['mean']:.3f}  "
                      f"AUC {te['auc']['mean']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            d = paired_difference(paired_bootstrap(members, args.bootstrap), "ncmi", "ce")
            diffs.append((c["name"], norm, d))
    print(f"\ngated ABMIL, default recipe, {args.seeds} seeds; test macro-F1 / macro AUC, mean ± std over seeds\n")
    print("| cohort | loss | none | zscore | zscore - none (F1 / AUC) |\n|---|---|---|---|---|")
    cell = {(n, l, f): (m1, m2) for n, l, f, m1, m2 in rows}
    for c in cohorts:
        for loss in LOSSES:
            a, b = cell[(c["name"], loss, "none")], cell[(c["name"], loss, "zscore")]
            fmt = lambda m: f"{m[0]['mean']:.3f} ± {m[0]['std']:.3f} / {m[1]['mean']:.3f} ± {m[1]['std']:.3f}"
            print(f"| {c['name']} | {loss} | {fmt(a)} | {fmt(b)} | {b[0]['mean'] - a[0]['mean']:+.3f} / "
                  f"{b[1]['mean'] - a[1]['mean']:+.3f} |")
    print("\nNCMI - CE, paired over seeds and test slides (95% bootstrap interval):\n")
    print("| cohort | feature norm | macro-F1 | macro AUC |\n|---|---|---|---|")
    for name, norm, d in diffs:
        f = lambda k: f"{d[k][0]:+.3f} [{d[k][1]:+.3f}, {d[k][2]:+.3f}]"
        print(f"| {name} | {norm} | {f('macro_f1')} | {f('auc')} |")
    if lesion:
        chance = next(iter(lesion.values())).chance
        print(f"\nDemo lesion AP (attention vs patches touching a lesion, micro and macro test slides, chance "
              f"{chance:.3f}):\n")
        print("| loss | none | zscore |\n|---|---|---|")
        for loss in LOSSES:
            a, b = lesion[(loss, "none")], lesion[(loss, "zscore")]
            print(f"| {loss} | {a.ap:.3f} ± {a.std:.3f} | {b.ap:.3f} ± {b.std:.3f} |")
    means = {(l, f): np.mean([cell[(c['name'], l, f)][0]['mean'] for c in cohorts]) for l in LOSSES for f in NORMS}
    print("\nmean macro-F1 over cohorts: " + ", ".join(f"{l} {f} {v:.3f}" for (l, f), v in means.items()))


if __name__ == "__main__":
    main()
