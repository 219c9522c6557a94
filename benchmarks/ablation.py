"""What does one training setting do, for CE and NCMI alike, on several cohorts? A recipe ablation.

    python benchmarks/ablation.py --workdir /tmp/ablation --demo wsi-ncmi-demo --grid feature_norm=zscore,none
    python benchmarks/ablation.py --workdir /tmp/ablation --demo wsi-ncmi-demo --grid patch_dropout=0,0.5
    python benchmarks/ablation.py --workdir /tmp/ablation --grid feature_norm=zscore,none --grid patch_dropout=0,0.5

Each ``--grid KEY=V1,V2,...`` names a ``TrainConfig`` field and its values; several grids are
crossed, and the first value of each is the baseline the differences are taken from. Every cell is
the default recipe with only those fields changed, ``--seeds`` seeds (3), gated ABMIL. Nothing is
tuned: the question is what the setting does at the defaults, for every loss alike.

Cohorts:
- ``generated``: bags from ``mil.synthetic.make_cohort`` with CAMELYON-17's slide shares, as
  ``benchmarks/loss_table.py`` draws them; they record their tumour instances, so the attention AP
  (each seed's attention ranking the tumour instances of its test bags) is measured too;
- ``digits``, ``breast_cancer``, ``wine``: the measurement cohorts of ``benchmarks/recipe.py`` (real
  scikit-learn rows, unscaled, plain CLAM-style HDF5);
- with ``--demo``: the real-H&E features of a ``wsi-ncmi demo`` folder, whose micro and macro test
  slides give the lesion AP (``demo.lesions``);
- with ``--held-out``, instead of the three measurement cohorts: four that no default was chosen on
  (``HELD_OUT``: digits with 3 as the positive digit, breast_cancer drawn anew, wine with cultivar 0
  positive, iris), to check that a setting chosen on the first three carries over; ``--held-out 2``
  (``HELD_OUT_2``: digits with 5 positive, breast_cancer drawn a third time, wine with cultivar 1,
  iris with versicolor positive), for a choice that the first held-out set has already informed.

Printed: test macro-F1 / macro AUC (mean +/- std over seeds) per cohort, loss and setting, with the
change from the baseline (paired over seeds and test slides, 95% bootstrap interval); the paired
NCMI - CE difference per setting; the attention AP where instances are known; the mean macro-F1 over
cohorts. Finished trainings under ``--workdir/runs`` are reused: a run folder is named by its loss
and the settings that differ from ``TrainConfig``'s defaults (``ce_default``, ``ce_patch_dropout=0.5``),
so one workdir serves every grid and the default runs are trained once.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch is imported, or it has no effect

import argparse
import contextlib
import io
import itertools
import json
import time
from pathlib import Path

import numpy as np

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.losses import LOSSES as ALL_LOSSES
from wsi_ncmi.mil.synthetic import CAMELYON17_LIKE_BAGS, make_cohort, make_measurement_cohort
from wsi_ncmi.train.compare import paired_bootstrap, paired_difference, read_test_predictions
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_training

MEASUREMENT = ("digits", "breast_cancer", "wine")
# --held-out: measurement cohorts that no default was chosen on (other positive classes, other draws of
# bags and rows, and iris): (name, dataset, positive classes, seed)
HELD_OUT = (("digits_p3_s1", "digits", (3,), 1), ("breast_cancer_s1", "breast_cancer", (0,), 1),
            ("wine_p0_s1", "wine", (0,), 1), ("iris_s1", "iris", (2,), 1))
# --held-out 2: a second such set, drawn after the first had informed a choice (NCMI's class score)
HELD_OUT_2 = (("digits_p5_s2", "digits", (5,), 2), ("breast_cancer_s2", "breast_cancer", (0,), 2),
              ("wine_p1_s2", "wine", (1,), 2), ("iris_p1_s2", "iris", (1,), 2))
HELD_OUT_SETS = {"1": HELD_OUT, "2": HELD_OUT_2}
LOSSES = ("ce", "ncmi")


NCMI_ONLY = {"ncmi_space", "ncmi_centroids", "ncmi_separation", "ncmi_centre", "ncmi_means", "ncmi_temperature",
             "ncmi_predict", "centroid_lr"}
RESERVED = {"task", "labels", "features", "out", "loss", "seeds", "seed", "resume", "overwrite", "progress",
            "bootstrap", "slides", "folds"}     # set by the benchmark itself


def _value(key: str, text: str):
    """``text`` as the type of ``TrainConfig.key`` (bool, int, str; a number where the field may hold
    one, or a word such as ``auto`` for ``lr`` and ``ncmi_temperature``)."""
    field = TrainConfig.__dataclass_fields__[key]
    default = field.default
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"--grid {key}={text}: give true or false")
        return text.lower() == "true"
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise SystemExit(f"--grid {key}={text}: give whole numbers") from None
    if isinstance(default, str) and "float" not in str(field.type):
        return text
    try:
        return float(text)
    except ValueError:
        return text


def _grid(text: str) -> tuple[str, list]:
    key, _, values = text.partition("=")
    if key not in TrainConfig.__dataclass_fields__ or not values:
        raise SystemExit(f"--grid {text}: give a TrainConfig field and values, e.g. feature_norm=none,zscore")
    if key in RESERVED:
        raise SystemExit(f"--grid {key}: the benchmark sets {key} itself; choose a training setting")
    return key, [_value(key, v) for v in values.split(",")]


def _run_name(loss: str, setting: dict) -> str:
    """``<loss>_<key>=<value>...`` over the settings that change the resolved config: a value equal to
    its default, or a temperature equal to what ``auto`` gives there, names the default run."""
    resolved = lambda s: TrainConfig(loss=loss, **s).validate().to_dict()
    changed = sorted((k, v) for k, v in setting.items()
                     if resolved({j: w for j, w in setting.items() if j != k}) != resolved(setting))
    return "_".join([loss] + [f"{k}={v}" for k, v in changed]) if changed else f"{loss}_default"


def _applies(loss: str, setting: dict) -> dict:
    """The part of ``setting`` that ``loss`` reads: CE ignores NCMI's own settings, so a grid over
    one of them trains (and reuses) a single CE run, its baseline for every value."""
    own = {"ncmi": NCMI_ONLY, "ce+ncmi": NCMI_ONLY - {"ncmi_predict", "ncmi_means"},   # ce+ncmi predicts by CE
           "cmi_ce": {"centroid_lr"}}.get(loss, set())
    return {k: v for k, v in setting.items() if k in own or k not in NCMI_ONLY}


def _train(cohort: dict, loss: str, setting: dict, seeds: int, work: Path) -> Path:
    from wsi_ncmi.train.runfolder import saved_differences

    setting = _applies(loss, setting)
    out = work / "runs" / cohort["name"] / _run_name(loss, setting)
    cfg = TrainConfig(task=cohort["task"], labels=cohort["labels"], features=cohort["features"], out=str(out),
                      loss=loss, seeds=seeds, resume=True, progress=False, bootstrap=100,
                      **{**cohort.get("extra", {}), **setting})
    if (out / "config.yaml").is_file() and (stale := saved_differences(out, cfg)):
        print(f"{out}: trained with other settings ({', '.join(stale)}, e.g. by an older wsi-ncmi); training it "
              "again", flush=True)
        cfg.overwrite = True
    elif all((out / f"seed_{s}" / "metrics.json").is_file() for s in range(seeds)):
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        run_training(cfg)                                   # resume adds seeds to a shorter run
    return out


def _attention_ap(cohort: dict, run: Path):
    """Attention AP against the known positives, or None for cohorts without them."""
    from wsi_ncmi.demo.lesions import attention_ap, lesion_ap

    if "demo" in cohort:
        return lesion_ap(run, cohort["features"], json.loads((cohort["demo"] / "lesions.json").read_text()))
    if cohort["name"] != "generated":
        return None
    import h5py

    def bags():
        for line in Path(cohort["labels"]).read_text().splitlines()[1:]:
            sid, _, split = line.split(",")
            if split == "test":
                with h5py.File(Path(cohort["features"]) / f"{sid}.h5", "r") as f:
                    yield sid, f["features"][:], f["is_tumour"][:]

    return attention_ap(run, bags())


def _cohorts(args, work: Path) -> list[dict]:
    """The cohorts to run, built on first use. Only those ``--only`` names are built, so two processes
    given disjoint ``--only`` lists never write the same files."""
    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    cohorts = []
    if args.demo and wanted("demo"):
        demo = Path(args.demo)
        cohorts.append(dict(name="demo", task="camelyon17", labels=str(demo / "stage_labels.csv"),
                            features=str(demo / "features"), extra=dict(val_fraction=0.2), demo=demo))
    root = work / "cohorts" / "generated"
    if wanted("generated"):
        if not (root / "labels.csv").is_file():
            make_cohort(root, n_slides=160, **CAMELYON17_LIKE_BAGS)
        cohorts.append(dict(name="generated", task="csv", labels=str(root / "labels.csv"),
                            features=str(root / "features")))
    measured = HELD_OUT_SETS[args.held_out] if args.held_out else [(ds, ds, None, 0) for ds in MEASUREMENT]
    for name, ds, positive, seed in measured:
        root = work / "cohorts" / name
        if not wanted(name):
            continue
        if not (root / "labels.csv").is_file():
            make_measurement_cohort(root, dataset=ds, seed=seed, positive=positive)
        cohorts.append(dict(name=name, task="csv", labels=str(root / "labels.csv"), features=str(root / "features")))
    return cohorts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="cohorts and runs are kept here and reused")
    ap.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                    help="a training setting and its values (repeat to cross several); the first value is the baseline")
    ap.add_argument("--demo", help="a `wsi-ncmi demo` folder: also its features (and lesion AP)")
    ap.add_argument("--only", nargs="*", help="a subset of cohorts: demo generated digits breast_cancer wine (with "
                                              "--held-out: " + " ".join(h[0] for h in HELD_OUT) + "; with "
                                              "--held-out 2: " + " ".join(h[0] for h in HELD_OUT_2) + ")")
    ap.add_argument("--held-out", nargs="?", const="1", choices=sorted(HELD_OUT_SETS),
                    help="the measurement cohorts no default was chosen on (other positive classes, other draws, "
                         "iris) instead of digits, breast_cancer and wine; 2: a second set, for choices the "
                         "first informed")
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=ALL_LOSSES,
                    help="the losses to train (default ce ncmi; the NCMI - CE table needs both)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    work = Path(args.workdir)
    grids = dict(_grid(g) for g in args.grid)
    settings = [dict(zip(grids, vals)) for vals in itertools.product(*grids.values())]
    for setting in settings:                               # a bad value fails before any training
        try:
            TrainConfig(**setting).validate()
        except (WsiNcmiError, TypeError) as e:
            raise SystemExit(f"--grid: {e}") from None
    name = lambda s: ", ".join(f"{k}={v}" for k, v in s.items())
    cohorts = _cohorts(args, work)
    cell, diffs, aps, members = {}, [], {}, {}
    for c in cohorts:
        for i, setting in enumerate(settings):
            for loss in args.losses:
                t0 = time.perf_counter()
                run = _train(c, loss, setting, args.seeds, work)
                te = json.loads((run / "metrics.json").read_text())["test"]
                cell[(c["name"], loss, i)] = (te["macro_f1"], te["auc"])
                members[(c["name"], loss, i)] = [read_test_predictions(run / f"seed_{s}") for s in range(args.seeds)]
                aps[(c["name"], loss, i)] = _attention_ap(c, run)
                print(f"{c['name']:14s} {loss:5s} {name(setting):40s} macro-F1 {te['macro_f1']['mean']:.3f}  "
                      f"AUC {te['auc']['mean']:.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if set(LOSSES) <= set(args.losses):
                pair = {loss: members[(c["name"], loss, i)] for loss in LOSSES}
                diffs.append((c["name"], i, paired_difference(paired_bootstrap(pair, args.bootstrap), "ncmi", "ce")))
    fmt = lambda m: f"{m[0]['mean']:.3f} ± {m[0]['std']:.3f} / {m[1]['mean']:.3f} ± {m[1]['std']:.3f}"
    ci = lambda d, k: f"{d[k][0]:+.3f} [{d[k][1]:+.3f}, {d[k][2]:+.3f}]"
    print(f"\ngated ABMIL, default recipe, {args.seeds} seeds; test macro-F1 / macro AUC, mean ± std over seeds; "
          f"change from the baseline ({name(settings[0])}) paired over seeds and test slides, 95% bootstrap "
          "interval\n")
    print("| cohort | loss | setting | macro-F1 / AUC | change in macro-F1 | change in AUC |\n|---|---|---|---|---|---|")
    def first(loss: str, i: int) -> int:   # the first setting that trains the same run for this loss
        return next(j for j in range(i + 1) if _applies(loss, settings[j]) == _applies(loss, settings[i]))

    for c in cohorts:
        for loss in args.losses:
            for i, setting in enumerate(settings):
                if first(loss, i) != i:          # the same run as an earlier row (a setting this loss ignores)
                    continue
                change = ""
                if i:
                    pair = {"new": members[(c["name"], loss, i)], "base": members[(c["name"], loss, 0)]}
                    d = paired_difference(paired_bootstrap(pair, args.bootstrap), "new", "base")
                    change = f"{ci(d, 'macro_f1')} | {ci(d, 'auc')}"
                print(f"| {c['name']} | {loss} | {name(setting)} | {fmt(cell[(c['name'], loss, i)])} | "
                      f"{change or ' | '} |")
    if diffs:
        print("\nNCMI − CE, paired over seeds and test slides (95% bootstrap interval):\n")
        print("| cohort | setting | macro-F1 | macro AUC |\n|---|---|---|---|")
        for cname, i, d in diffs:
            print(f"| {cname} | {name(settings[i])} | {ci(d, 'macro_f1')} | {ci(d, 'auc')} |")
    known = [c["name"] for c in cohorts if aps[(c["name"], args.losses[0], 0)] is not None]
    if known:
        print("\nAttention AP: each seed's attention ranking the known positive instances of the test bags "
              "(demo: patches touching a lesion on micro and macro slides), mean ± std over seeds:\n")
        print("| cohort | loss | setting | attention AP | chance |\n|---|---|---|---|---|")
        for cname in known:
            for loss in args.losses:
                for i, setting in enumerate(settings):
                    if first(loss, i) != i:
                        continue
                    a = aps[(cname, loss, i)]
                    print(f"| {cname} | {loss} | {name(setting)} | {a.ap:.3f} ± {a.std:.3f} | {a.chance:.3f} |")
    print("\nmean macro-F1 over cohorts: " + ", ".join(
        f"{loss} [{name(s)}] {np.mean([cell[(c['name'], loss, i)][0]['mean'] for c in cohorts]):.3f}"
        for loss in args.losses for i, s in enumerate(settings) if first(loss, i) == i))


if __name__ == "__main__":
    main()
