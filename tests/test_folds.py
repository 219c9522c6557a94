"""``--folds K``: fold assignment (whole patients, stratified, deterministic) on the real CAMELYON-17
slide list and on CSV cohorts, and fold runs end to end on real HDF5 bags: fold folders, pooled
out-of-fold predictions, top-level metrics with CIs, evaluate, resume and the errors."""

import contextlib
import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from wsi_ncmi.cli import build_parser, main
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.mil.synthetic import make_camelyon17_cohort, make_cohort
from wsi_ncmi.tasks import load_task
from wsi_ncmi.tasks.base import SlideRecord
from wsi_ncmi.tasks.camelyon17 import CLASSES
from wsi_ncmi.tasks.folds import OOF, assign_folds, cv_pool, fold_assignment, fold_task
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_evaluation, run_training

C17 = Path(__file__).parent / "data" / "camelyon17_stage_labels.csv"   # the real 500-slide list


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _check_folds(records, fold_of: dict, k: int, tol: float) -> None:
    """Every record in exactly one fold, no patient in two, every class in every fold, proportions close."""
    assert set(fold_of) == {r.slide_id for r in records} and set(fold_of.values()) == set(range(k))
    by_patient: dict = {}
    for r in records:
        by_patient.setdefault(r.patient or r.slide_id, set()).add(fold_of[r.slide_id])
    assert all(len(f) == 1 for f in by_patient.values())
    whole = Counter(r.label for r in records)
    for f in range(k):
        c = Counter(r.label for r in records if fold_of[r.slide_id] == f)
        n = sum(c.values())
        for lab, total in whole.items():
            assert c[lab] >= 1, (f, lab)
            assert abs(c[lab] / n - total / len(records)) <= tol, (f, lab, c, whole)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_camelyon17_folds_cover_centres_0_to_2_by_whole_patients(k, split_seed):
    t = load_task("camelyon17", labels=str(C17), split_seed=split_seed)
    fold_of = fold_assignment(t, k, split_seed)
    pool = cv_pool(t)
    assert {s.centre for s in pool} == {0, 1, 2} and len(pool) == 300
    _check_folds(pool, fold_of, k, tol=0.05)
    assert fold_assignment(load_task("camelyon17", labels=str(C17), split_seed=split_seed), k, split_seed) == fold_of
    assert fold_assignment(t, k, split_seed + 10) != fold_of
    seen_oof = []
    for f in range(k):
        ft = fold_task(t, fold_of, f, 0.1, split_seed)
        assert ft.counts()["test"] == [121, 16, 18, 45]                       # centres 3-4 stay held out
        assert {s.slide_id for s in ft.split(OOF)} == {sid for sid, g in fold_of.items() if g == f}
        splits_of = {}
        for s in ft.slides:
            splits_of.setdefault(s.patient, set()).add(s.split)
        assert all(len(v) == 1 for v in splits_of.values())                  # no patient in two splits
        assert all(n >= 1 for n in ft.counts()["train"]) and ft.split("val")
        seen_oof += [s.slide_id for s in ft.split(OOF)]
    assert sorted(seen_oof) == sorted(s.slide_id for s in pool)              # each pool slide out of fold once
    assert [s.split for s in t.slides] == [s.split for s in load_task("camelyon17", labels=str(C17),
                                                                      split_seed=split_seed).slides]   # untouched


def test_every_class_reaches_every_fold_on_random_cohorts():
    # patients holding several classes; seeds 993 and 1489 need the last pass (one swap) to fill a fold
    done = 0
    for seed in list(range(300)) + [993, 1489]:
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 7))
        recs = [SlideRecord(f"p{p}_{j}", int(lab), patient=f"p{p}") for p in range(int(rng.integers(k, 40)))
                for j, lab in enumerate(rng.choice(4, size=int(rng.integers(1, 6)), p=[.55, .2, .15, .1]))]
        try:
            fold_of = assign_folds(recs, k, seed)
        except WsiNcmiError as exc:
            assert "patient(s) in the cross-validation pool" in str(exc)
            continue
        _check_folds(recs, fold_of, k, tol=1.0)
        done += 1
    assert done > 150


def test_bracs_folds_cover_the_official_train_and_val_and_hold_out_its_test():
    t = load_task("bracs", labels=str(Path(__file__).parent / "data" / "bracs_official_split.csv"))
    fold_of = fold_assignment(t, 5, 0)
    pool = cv_pool(t)
    assert len(pool) == 395 + 65 and {s.split for s in pool} == {"train", "val"}
    _check_folds(pool, fold_of, 5, tol=0.05)
    ft = fold_task(t, fold_of, 4, 0.1, 0)
    assert {s.slide_id for s in ft.split("test")} == {s.slide_id for s in t.split("test")} and len(ft.split("test")) == 87


def test_csv_folds_keep_patients_together_and_follow_the_split_and_fold_columns(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for p in range(90):                      # 1-4 slides per patient, imbalanced classes, mixed within patients
        base = int(rng.choice(3, p=[0.6, 0.25, 0.15]))
        for j in range(int(rng.integers(1, 5))):
            rows.append((f"s{p:03d}_{j}", base if rng.random() < 0.8 else int(rng.integers(0, 3)), f"pat{p:03d}"))
    c = tmp_path / "c.csv"
    c.write_text("slide_id,label,patient\n" + "".join(f"{s},{y},{p}\n" for s, y, p in rows))
    t = load_task("csv", labels=str(c))
    assert not t.fixed_test and len(cv_pool(t)) == len(rows)                # no split column: folds cover all
    fold_of = fold_assignment(t, 5, 0)
    _check_folds(t.slides, fold_of, 5, tol=0.08)
    ft = fold_task(t, fold_of, 2, 0.15, 0)
    assert not ft.split("test") and len(ft.split(OOF)) == sum(v == 2 for v in fold_of.values())

    split = {p: ("test", "val", "train", "train", "train")[i % 5] for i, p in enumerate(sorted({r[2] for r in rows}))}
    c.write_text("slide_id,label,patient,split\n" + "".join(f"{s},{y},{p},{split[p]}\n" for s, y, p in rows))
    t = load_task("csv", labels=str(c))
    fold_of = fold_assignment(t, 3, 0)
    assert set(fold_of) == {s for s, _, p in rows if split[p] != "test"}     # the split column's test held out
    assert fold_task(t, fold_of, 0, 0.1, 0).split("test") == [s for s in t.slides if s.split == "test"]

    fold = {p: i % 4 for i, p in enumerate(sorted({r[2] for r in rows}))}
    c.write_text("slide_id,label,patient,fold\n" + "".join(f"{s},{y},{p},{fold[p]}\n" for s, y, p in rows))
    t = load_task("csv", labels=str(c))
    assert fold_assignment(t, 4, 0) == {s: fold[p] for s, _, p in rows}      # the fold column's own folds
    with pytest.raises(WsiNcmiError, match=r"--folds 5: .* fold column with 4 folds \(0, 1, 2, 3\); pass --folds 4"):
        fold_assignment(t, 5, 0)
    bad = rows[:-1] + [(rows[-1][0], rows[-1][1], "pat001")]     # last slide joins patient 1 (fold 1) in fold 2
    c.write_text("slide_id,label,patient,fold\n" + "".join(
        f"{s},{y},{p},{fold[p] if s != bad[-1][0] else 2}\n" for s, y, p in bad))
    with pytest.raises(WsiNcmiError, match=r"patient pat001 has slides in folds 1 and 2; put each patient"):
        fold_assignment(load_task("csv", labels=str(c)), 4, 0)


def test_fold_errors_name_the_value_and_the_fix(tmp_path):
    recs = [SlideRecord(f"s{i}", i % 2, patient=f"p{i // 2}") for i in range(12)]   # 6 patients, each both classes
    recs += [SlideRecord("r0", 2, patient="q0"), SlideRecord("r1", 2, patient="q1"), SlideRecord("r2", 2, patient="q1")]
    with pytest.raises(WsiNcmiError, match=r"^--folds 3: class rare has only 2 patient\(s\) .*; pass --folds 2 or fewer$"):
        assign_folds(recs, 3, 0, ["a", "b", "rare"])
    assert set(assign_folds(recs, 2, 0).values()) == {0, 1}
    for k in (1, -2):
        with pytest.raises(WsiNcmiError, match=rf"^--folds {k}: cross-validation needs at least 2 folds"):
            TrainConfig(folds=k).validate()
    cohort = make_cohort(tmp_path / "c", n_slides=20, dim=4, bag_size=(4, 6))   # 4 train+val slides a class
    out = tmp_path / "run"
    rc, _, err = cli("train", "--task", "csv", "--labels", cohort / "labels.csv", "--features", cohort / "features",
                     "--out", out, "--folds", "5", "-q")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--folds 5: class" in err and "pass --folds" in err
    assert not (out / "run.json").exists()                                   # refused before anything is written
    rc, _, err = cli("train", "--task", "csv", "--labels", cohort / "labels.csv", "--features", cohort / "features",
                     "--out", out, "--folds", "1", "-q")
    assert rc == 2 and "--folds 1: cross-validation needs at least 2 folds" in err
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    help_text = " ".join(sub.choices["train"].format_help().split())
    assert "--folds" in help_text and "default: off, the single split" in help_text and "whole patients" in help_text


def _c17_cohort(root: Path) -> Path:
    """Node bags named as in the challenge (5 patients per centre, 5 nodes each) in the official label format."""
    return make_camelyon17_cohort(root, dim=6, bag_size=20)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_camelyon17_fold_run_end_to_end_evaluate_and_resume(tmp_path):
    c = _c17_cohort(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--task", "camelyon17", "--labels", c / "stage_labels.csv", "--features", c / "features",
            "--out", out, "--folds", "3", "--seeds", "2", "--epochs", "2", "--loss", "ce", "--bootstrap", "30", "-q"]
    rc, log, err = cli(*args)
    assert rc == 0, err
    assert "3-fold cross-validation over 75 slides, held-out test 50" in log
    agg = json.loads((out / "metrics.json").read_text())
    assert agg["folds"] == 3 and agg["seeds"] == [0, 1] and sum(agg["counts"]["pool"]) == 75
    assert [sum(f) for f in agg["counts"]["folds"]] == [sum(1 for r in csv.DictReader(open(out / "folds.csv"))
                                                            if r["fold"] == str(k)) for k in range(3)]
    for k in range(3):                                                   # each fold folder: a run's layout
        for s in (0, 1):
            for f in ("best.pt", "metrics.json", "predictions_oof.csv", "predictions_test.csv", "history.csv"):
                assert (out / f"fold_{k}" / f"seed_{s}" / f).is_file(), (k, s, f)
        fm = json.loads((out / f"fold_{k}" / "metrics.json").read_text())
        assert fm["seeds"] == [0, 1] and {"val", "oof", "test"} <= set(fm)
        assert sum(fm["counts"]["test"]) == 50 and fm["counts"]["test"] == agg["counts"]["test"]
    # pooled OOF: every centre 0-2 slide once per seed, in the fold folds.csv gives it
    folds = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader(open(out / "folds.csv"))}
    assert len(folds) == 75 and all(int(s[8:11]) < 60 for s in folds)
    rows = list(csv.DictReader(open(out / "predictions_oof.csv")))
    for seed in (0, 1):
        mine = [r for r in rows if r["seed"] == str(seed)]
        assert sorted(r["slide_id"] for r in mine) == sorted(folds)
        assert all(folds[r["slide_id"]] == int(r["fold"]) for r in mine)
        pooled = agg["oof_pooled"]["per_seed"][seed]
        y, p = [int(r["label"]) for r in mine], [int(r["pred"]) for r in mine]
        assert pooled["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=sorted(set(y) | set(p))))
        for key in ("macro_f1", "auc", "balanced_accuracy"):
            lo, hi = pooled["ci95"][key]
            assert 0 <= lo <= hi <= 1
        assert pooled["patient_pn"]["patients"] == 15                      # all five nodes of every pool patient
    assert set(agg["test"]) >= {"macro_f1", "auc", "patient_qwk"} and set(agg["oof"]) >= {"macro_f1", "ncmi"}
    md = (out / "metrics.md").read_text()
    assert "pooled out-of-fold, 75 slides" in md and "held-out test (mean ± std over 6 folds x seeds)" in md
    ident = json.loads((out / "run.json").read_text())["identity"]
    assert ident["folds"] == 3 and "folds: 3" in (out / "config.yaml").read_text()

    # a fold folder serves its own models (heatmaps); the run itself names the fold folders
    from wsi_ncmi.train.inference import load_run_model

    rm = load_run_model(out / "fold_1", 1, 6)
    assert rm.classes == CLASSES and rm.cfg.folds == 3
    with pytest.raises(WsiNcmiError, match=r"3-fold cross-validation run, one model per fold; pass a fold folder"):
        load_run_model(out, 0, 6)

    # evaluate re-scores every fold into evaluate/ and pools to the same numbers
    with contextlib.redirect_stdout(io.StringIO()):
        again = run_evaluation(out)
    assert (out / "evaluate" / "fold_2" / "seed_1" / "predictions_oof.csv").is_file()
    assert again["oof_pooled"]["macro_f1"] == pytest.approx(agg["oof_pooled"]["macro_f1"])
    assert again["test"]["macro_f1"]["mean"] == pytest.approx(agg["test"]["macro_f1"]["mean"])
    saved = (out / "folds.csv").read_text()
    lines = saved.splitlines()
    moved = lines[1].rsplit(",", 1)[0] + "," + str((int(lines[1].rsplit(",", 1)[1]) + 1) % 3)
    (out / "folds.csv").write_text("\n".join([lines[0], moved] + lines[2:]) + "\n")
    rc, _, err = cli("evaluate", out)                                     # folds drawn otherwise: refused
    assert rc == 2 and "differ from those in" in err and "folds.csv" in err
    (out / "folds.csv").write_text(saved)

    # rerunning needs --resume; --resume keeps finished folds and trains only what is missing
    rc, _, err = cli(*args)
    assert rc == 2 and "fold_0/seed_0 finished" in err and "--resume" in err
    kept = {k: _digest(out / f"fold_{k}") for k in (0, 1)}
    import shutil

    shutil.rmtree(out / "fold_2" / "seed_1")
    (out / "fold_2" / "metrics.json").unlink()
    (out / "metrics.json").unlink()
    rc, log, err = cli(*args, "--resume")
    assert rc == 0, err
    assert "fold 0: already finished, kept" in log and "fold 1: already finished, kept" in log
    assert "seed 0: already finished, kept" in log and "fold 3/3" in log     # fold 2: seed 0 kept, seed 1 trained
    assert {k: _digest(out / f"fold_{k}") for k in (0, 1)} == kept
    assert (out / "fold_2" / "seed_1" / "best.pt").is_file() and (out / "metrics.json").is_file()
    rc, _, err = cli(*[a if a != "3" else "4" for a in args], "--resume")
    assert rc == 2 and "folds (3 -> 4)" in err                             # the folds are part of the identity


def test_csv_fold_run_without_a_test_split_pools_every_slide(tmp_path):
    c = make_cohort(tmp_path / "c", n_slides=24, dim=6, bag_size=(8, 12), separation=6.0)
    ids = [r["slide_id"] for r in csv.DictReader(open(c / "labels.csv"))]
    labels = [r["label"] for r in csv.DictReader(open(c / "labels.csv"))]
    (c / "cv.csv").write_text("slide_id,label,patient\n" + "".join(
        f"{s},{y},p{i % 12}\n" for i, (s, y) in enumerate(zip(ids, labels))))     # two slides per patient
    cfg = TrainConfig(task="csv", labels=str(c / "cv.csv"), features=str(c / "features"), out=str(tmp_path / "run"),
                      folds=2, epochs=2, loss="ce", bootstrap=20, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        agg = run_training(cfg)
    assert "test" not in agg and agg["counts"]["test"] == [0, 0, 0, 0]
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions_oof.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(ids)
    fold_of = {r["slide_id"]: r["fold"] for r in rows}
    assert all(fold_of[ids[i]] == fold_of[ids[i + 12]] for i in range(12))     # a patient's slides: one fold
    assert agg["oof_pooled"]["n"] == 24 and "ci95" in agg["oof_pooled"]["per_seed"][0]
    rc, table, err = cli("report", tmp_path / "run")
    assert rc == 0 and "abmil/ce" in table, err
    ncmi = TrainConfig(**{**cfg.to_dict(), "loss": "ncmi", "out": str(tmp_path / "ncmi")})
    with contextlib.redirect_stdout(io.StringIO()):
        agg = run_training(ncmi)
    assert set(agg["ncmi_predict"]) == {"fold_0", "fold_1"}
    assert all(len(r) == 1 and r[0] in ("nearest", "bayes") for r in agg["ncmi_predict"].values())
    assert f"NCMI prediction rule per fold (seeds in order): fold_0 {agg['ncmi_predict']['fold_0'][0]}; fold_1 " \
        in (tmp_path / "ncmi" / "metrics.md").read_text()
