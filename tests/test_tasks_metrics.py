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
    val, trval = t.counts()["val"], [a + b for a, b in zip(t.counts()["train"], t.counts()["val"])]
    assert all(abs(v - 0.1 * n) <= 1 for v, n in zip(val, trval))   # stratified 10%
    assert t.split("val")[0].slide_id == load_task("camelyon17", labels=str(C17)).split("val")[0].slide_id


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
    t = load_task("bracs", slides=str(root))
    assert t.counts() == {"train": [1, 0, 0, 0, 1, 0, 1], "val": [0, 0, 0, 0, 0, 1, 0], "test": [0, 1, 0, 1, 0, 0, 0]}
    assert load_task("bracs3", slides=str(root)).counts()["train"] == [1, 1, 1]


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
