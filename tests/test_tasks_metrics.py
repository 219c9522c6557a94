"""Task parsing from the datasets' own files, and metrics against scikit-learn."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks import load_task, pn_stage
from wsi_ncmi.train.metrics import bootstrap_ci, classification_metrics

DATA = Path(__file__).parent / "data"
C17 = DATA / "camelyon17_stage_labels.csv"   # public CAMELYON-17 labels in the challenge's format
BRACS = DATA / "bracs_official_split.csv"    # public BRACS split as published with ACMIL


def test_camelyon17_counts_centres_and_split():
    t = load_task("camelyon17", labels=str(C17))
    assert len(t.slides) == 500
    assert [sum(c[k] for c in t.counts().values()) for k in range(4)] == [318, 36, 59, 87]
    assert t.counts()["test"] == [121, 16, 18, 45]
    assert {s.centre for s in t.split("test")} == {3, 4}
    assert {s.centre for s in t.split("train") + t.split("val")} == {0, 1, 2}
    val = t.counts()["val"]
    assert all(v >= 1 for v in val) and 20 <= sum(val) <= 40         # every class, about 10% of 300
    assert t.split("val")[0].slide_id == load_task("camelyon17", labels=str(C17)).split("val")[0].slide_id


@pytest.mark.parametrize("split_seed", range(6))
def test_camelyon17_splits_never_share_a_patient(split_seed):
    # the real 500-slide list: a patient's five nodes once landed in train and val independently
    from wsi_ncmi.tasks.base import patients_in_two_splits

    t = load_task("camelyon17", labels=str(C17), split_seed=split_seed, val_fraction=0.1)
    assert patients_in_two_splits(t.slides) == {}
    assert all(len({s.split for s in t.slides if s.patient == p}) == 1 for p in {s.patient for s in t.slides})
    assert all(v >= 1 for v in t.counts()["val"])


def test_the_validation_draw_never_takes_a_class_out_of_training():
    # patients holding several classes: a rare class's only patient must stay in train
    from wsi_ncmi.tasks.base import SlideRecord, stratified_val

    for seed in range(200):
        rng = np.random.default_rng(seed)
        recs = [SlideRecord(f"p{p}_{j}", int(lab), patient=f"p{p}") for p in range(12)
                for j, lab in enumerate(rng.choice(4, size=int(rng.integers(1, 4)), p=[.6, .15, .15, .1]))]
        stratified_val(recs, 0.2, seed)
        assert {r.label for r in recs if r.split == "train"} == {r.label for r in recs}, seed
        assert all(len({r.split for r in recs if r.patient == p}) == 1 for p in {r.patient for r in recs})


def test_csv_splits_keep_patients_together_and_refuse_a_leaking_split_column(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(f"s{p:03d}_{k}", int(rng.integers(0, 3)), f"pat{p:03d}") for p in range(60) for k in range(3)]
    drawn = tmp_path / "drawn.csv"
    drawn.write_text("slide_id,label,patient\n" + "".join(f"{s},{y},{p}\n" for s, y, p in rows))
    from wsi_ncmi.tasks.base import patients_in_two_splits

    for seed in range(3):
        t = load_task("csv", labels=str(drawn), split_seed=seed)
        assert patients_in_two_splits(t.slides) == {} and all(len(t.split(sp)) for sp in ("train", "val", "test"))
    given = tmp_path / "given.csv"
    given.write_text("slide_id,label,split,patient\na1,x,train,pA\na2,y,test,pA\nb1,x,train,pB\nb2,y,val,pB\n"
                     "c1,y,train,pC\nd1,x,test,pD\n")
    with pytest.raises(WsiNcmiError, match=r"given.csv: 2 patient\(s\).*first: pA in test and train.*--allow-patient-overlap"):
        load_task("csv", labels=str(given))
    t = load_task("csv", labels=str(given), allow_patient_overlap=True)
    assert "pA" in t.notes[0] and len(t.split("test")) == 2


def test_bracs_patients_and_folders_are_checked(tmp_path):
    t = load_task("bracs", labels=str(BRACS))     # case_id is the patient; the official split is patient-safe
    assert len({s.patient for s in t.slides}) == 547 and t.notes == []
    leak = tmp_path / "bracs.csv"
    leak.write_text("case_id,slide_id,split_info,label\npatient_1,BRACS_1,train,0\npatient_1,BRACS_2,test,6\n"
                    "patient_2,BRACS_3,test,5\n")
    with pytest.raises(WsiNcmiError, match="patient_1 in test and train"):
        load_task("bracs", labels=str(leak))
    root = tmp_path / "BRACS_WSI"
    for sp, typ in (("train", "N"), ("test", "N"), ("test", "IC")):
        d = root / sp / "Group_BT" / f"Type_{typ}"
        d.mkdir(parents=True, exist_ok=True)
        (d / ("BRACS_9.svs" if typ == "N" else "BRACS_8.svs")).write_bytes(b"")
    with pytest.raises(WsiNcmiError, match=r"slide BRACS_9 is in two places"):
        load_task("bracs", slides=str(root))


def test_pn_stage_rules_reproduce_the_official_patient_stages():
    t = load_task("camelyon17", labels=str(C17))
    nodes = {}
    for s in t.slides:
        nodes.setdefault(s.patient, []).append(s.label)
    assert all(pn_stage(v) == t.patient_stages[p] for p, v in nodes.items())
    assert Counter(t.patient_stages.values()) == {"pN0": 24, "pN0(i+)": 11, "pN1mi": 21, "pN1": 30, "pN2": 14}
    assert pn_stage(["macro", "micro", "micro", "micro", "negative"]) == "pN2"
    assert pn_stage(["macro", "itc", "itc", "itc", "negative"]) == "pN1"


def test_bracs_from_csv_and_from_the_folder_layout(tmp_path):
    t = load_task("bracs", labels=str(BRACS))
    assert [len(t.split(s)) for s in ("train", "val", "test")] == [395, 65, 87]
    t3 = load_task("bracs3", labels=str(BRACS))
    assert t3.classes == ["benign", "atypical", "malignant"] and sum(map(sum, t3.counts().values())) == 547
    root = tmp_path / "BRACS_WSI"
    for sp, grp, typ, sid in [("train", "BT", "N", "BRACS_1"), ("train", "AT", "ADH", "BRACS_2"),
                              ("train", "MT", "IC", "BRACS_3"), ("val", "MT", "DCIS", "BRACS_4"),
                              ("test", "BT", "PB", "BRACS_5"), ("test", "AT", "FEA", "BRACS_6")]:
        d = root / sp / f"Group_{grp}" / f"Type_{typ}"
        d.mkdir(parents=True)
        (d / f"{sid}.svs").write_bytes(b"")
    with pytest.raises(WsiNcmiError, match="class\\(es\\) PB, UDH, FEA, DCIS have no training slides"):
        load_task("bracs", slides=str(root))          # 7 classes, 4 never seen in training
    t = load_task("bracs3", slides=str(root))
    assert t.counts() == {"train": [1, 1, 1], "val": [0, 0, 1], "test": [1, 1, 0]}
    assert t.warnings() == ["val split has no slide of class(es) benign, atypical: macro-F1 and AUC on val average "
                            "over the classes it holds (and any it wrongly predicts)",
                            "test split has no slide of class(es) malignant: macro-F1 and AUC on test average "
                            "over the classes it holds (and any it wrongly predicts)"]


def test_bad_label_files_name_the_file(tmp_path):
    bad = tmp_path / "stage.csv"
    bad.write_text("slide,stage\n")
    with pytest.raises(WsiNcmiError, match="stage.csv: expected the official header"):
        load_task("camelyon17", labels=str(bad))
    bad.write_text("patient,stage\npatient_000_node_0.tif,huge\n")
    with pytest.raises(WsiNcmiError, match=r"stage.csv:2: slide label 'huge'"):
        load_task("camelyon17", labels=str(bad))
    with pytest.raises(WsiNcmiError, match="needs --labels"):
        load_task("camelyon17")
    c = tmp_path / "c.csv"
    c.write_text("slide_id,label,split\na,x,train\nb,y,holdout\n")
    with pytest.raises(WsiNcmiError, match="split must be train, val or test"):
        load_task("csv", labels=str(c))
    c.write_text("slide,label\n")
    with pytest.raises(WsiNcmiError, match="needs columns slide_id,label"):
        load_task("csv", labels=str(c))


def test_csv_task_with_folds_and_without_split(tmp_path):
    c = tmp_path / "c.csv"
    rows = [f"s{i},{'ab'[i % 2]},{i % 5}" for i in range(50)]
    c.write_text("slide_id,label,fold\n" + "\n".join(rows) + "\n")
    t = load_task("csv", labels=str(c), test_fold=2)
    assert {s.slide_id for s in t.split("test")} == {f"s{i}" for i in range(50) if i % 5 == 2}
    assert t.split("val") and t.classes == ["a", "b"]
    c.write_text("slide_id,label\n" + "\n".join(f"s{i},{i % 3}" for i in range(60)) + "\n")
    t = load_task("csv", labels=str(c))
    assert [len(t.split(s)) for s in ("train", "val", "test")] == [42, 9, 9]


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    scores = rng.dirichlet(np.ones(4), 80) + np.eye(4)[y] * 0.3
    scores /= scores.sum(1, keepdims=True)
    pred = scores.argmax(1)
    m = classification_metrics(y, pred, scores, 4)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["per_class_f1"] == pytest.approx(list(f1_score(y, pred, average=None)))
    assert np.trace(np.array(m["confusion"])) == (y == pred).sum()
    ci = bootstrap_ci(y, pred, scores, 4, n=200)
    assert ci["macro_f1"][0] < m["macro_f1"] < ci["macro_f1"][1]
    from wsi_ncmi.train.metrics import quadratic_kappa

    assert quadratic_kappa([0, 1, 2, 3], [0, 2, 2, 3]) == pytest.approx(cohen_kappa_score([0, 1, 2, 3], [0, 2, 2, 3], weights="quadratic"))


@pytest.mark.parametrize("body, message", [
    ("a,x,train\nb,x,val\nc,x,test\n", "every slide has the same label \\(x\\)"),
    ("a,x,train\nb,x,val\nc,y,test\nd,y,val\n", "class\\(es\\) y have no training slides"),
    ("a,x,train\nb,y,train\nc,x,test\nd,y,test\n", "task .csv. has no validation slides.*--val-fraction"),
    ("a,Macro,train\nb,macro,train\nc,x,val\nd,x,test\n", "labels 'Macro' and 'macro' differ only by case"),
    ("a,macro ,train\nb,macro,train\nc,x,val\nd,x,test\n", "labels 'macro' and 'macro ' differ only by case or whitespace"),
])
def test_cohorts_no_model_can_learn_are_refused_before_training(tmp_path, body, message):
    f = tmp_path / "cohort.csv"
    f.write_text("slide_id,label,split\n" + body)
    with pytest.raises(WsiNcmiError, match=rf"cohort.csv: {message}"):
        load_task("csv", labels=str(f))


def test_camelyon17_conflicting_duplicate_rows_are_refused(tmp_path):
    rows = C17.read_text().splitlines()
    same = tmp_path / "same.csv"
    same.write_text("\n".join(rows + [rows[2]]) + "\n")             # an identical repeat is harmless
    assert len(load_task("camelyon17", labels=str(same)).slides) == 500
    other = "patient_000_node_0.tif,macro"
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("\n".join(rows + [other]) + "\n")
    with pytest.raises(WsiNcmiError, match=r"conflict.csv:602: patient_000_node_0 is listed again with label 'macro' "
                                           r"\(first 'negative'\)"):
        load_task("camelyon17", labels=str(conflict))


def test_macro_f1_leaves_out_a_class_absent_from_the_split_and_never_predicted():
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])
    scores = np.eye(3)[pred]
    m = classification_metrics(y, pred, scores, 3)                 # class 2: no slide, never predicted
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    m2 = classification_metrics(y, np.array([0, 2, 1, 0]), np.eye(3)[[0, 2, 1, 0]], 3)   # predicted, absent: counts
    assert m2["macro_f1"] == pytest.approx(f1_score(y, [0, 2, 1, 0], labels=[0, 1, 2], average="macro", zero_division=0))


def test_resampled_metrics_equal_the_full_ones():
    """The bootstraps' fast metrics (the paired comparison's and a run's test CIs) are
    ``classification_metrics``' values, including ties in the scores, classes missing from a
    resample, and the binary case."""
    from wsi_ncmi.train.compare import paired_bootstrap, paired_difference
    from wsi_ncmi.train.metrics import RESAMPLED, resample_metrics

    rng = np.random.default_rng(0)
    for C in (2, 4):
        for _ in range(200):
            n = int(rng.integers(3, 30))
            y, pred = rng.integers(0, C, n), rng.integers(0, C, n)
            p = rng.random((n, C)).round(1)
            m, f = classification_metrics(y, pred, p, C), resample_metrics(y, pred, p)
            for k, v in zip(RESAMPLED, f):
                assert (np.isnan(v) and np.isnan(m[k])) or v == pytest.approx(m[k]), k
    y, pred = rng.integers(0, 4, 25), rng.integers(0, 4, 25)   # the CIs are those of the full metrics
    p = rng.random((25, 4)).round(1)
    full = {k: [] for k in RESAMPLED}
    boot = np.random.default_rng(3)
    for _ in range(60):
        i = boot.integers(0, 25, 25)
        m = classification_metrics(y[i], pred[i], p[i], 4)
        for k in RESAMPLED:
            if np.isfinite(m[k]):
                full[k].append(m[k])
    ci = bootstrap_ci(y, pred, p, 4, n=60, seed=3)
    for k in RESAMPLED:
        assert ci[k] == pytest.approx([np.quantile(full[k], 0.025), np.quantile(full[k], 0.975)], rel=1e-12), k
    ids = [f"s{i:02d}" for i in range(30)]
    y = rng.integers(0, 3, 30)
    noisy = lambda k: np.eye(3)[y] * k + rng.random((30, 3))   # noqa: E731
    runs = {name: [(ids, y, noisy(k).argmax(1), noisy(k)) for _ in range(3)] for name, k in (("a", 2.0), ("b", 0.3))}
    d = paired_difference(paired_bootstrap(runs, 300), "a", "b")
    assert d["macro_f1"][1] > 0 and d["macro_f1"][1] <= d["macro_f1"][0] <= d["macro_f1"][2]
    with pytest.raises(ValueError, match="same test slides"):
        paired_bootstrap({"a": runs["a"], "b": [(ids[::-1], y, y, noisy(1))]}, 10)
