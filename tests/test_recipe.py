"""The training recipe: selection criterion, minimum epochs, --lr auto, NCMI's running class means."""

import contextlib
import io
import json
import math

import pytest

from wsi_ncmi.mil.synthetic import make_cohort
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.lr_search import LR_GRID
from wsi_ncmi.train.run import run_evaluation, run_training
from wsi_ncmi.train.trainer import improves, selection_value

from conftest import run_cli


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("recipe"), n_slides=40, dim=16, bag_size=(20, 40), separation=6.0)


def _quiet(fn, *a):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a)


def test_selection_ranks_validation_loss_then_macro_f1():
    a = selection_value({"nll": 0.50, "macro_f1": 0.6}, "loss")
    b = selection_value({"nll": 0.40, "macro_f1": 0.5}, "loss")
    c = selection_value({"nll": 0.40, "macro_f1": 0.7}, "loss")
    assert a == [-0.5, 0.6]
    assert improves(b, a) and not improves(a, b)          # lower NLL wins whatever the F1
    assert improves(c, b) and not improves(b, c)          # equal NLL: macro-F1 breaks the tie
    assert not improves(b, b)
    nan = selection_value({"nll": math.nan, "macro_f1": 0.9}, "loss")
    assert nan[0] == -math.inf and improves(a, nan)       # a non-finite criterion ranks last
    assert improves([0.2, 0.0], 0.1) and not improves([0.1, 0.0], 0.2)   # legacy float best values


def test_early_stopping_cannot_fire_before_min_epochs(cohort, tmp_path):
    """Patience 0 would stop after the first epoch that does not improve; min-epochs holds it off."""
    kw = dict(task="csv", labels=str(cohort / "labels.csv"), features=str(cohort / "features"), lr=1e-3,
              epochs=8, patience=0, progress=False, bootstrap=10)
    _quiet(run_training, TrainConfig(out=str(tmp_path / "a"), min_epochs=6, **kw))
    rows = (tmp_path / "a" / "seed_0" / "history.csv").read_text().splitlines()[1:]
    assert len(rows) >= 6
    assert TrainConfig().min_epochs == 10 and TrainConfig().select_metric == "loss"


def test_lr_auto_searches_the_grid_on_validation_and_records_the_choice(cohort, tmp_path):
    out = tmp_path / "auto"
    r = run_cli("train", "--task", "csv", "--labels", str(cohort / "labels.csv"), "--features",
                str(cohort / "features"), "--out", str(out), "--epochs", "2", "--min-epochs", "0", "--lr", "auto",
                "--seeds", "2", "--bootstrap", "10")
    assert r.returncode == 0, r.stderr
    stdout = r.stdout
    rec = json.loads((out / "lr_search.json").read_text())
    assert rec["grid"] == list(LR_GRID) and len(rec["trials"]) == len(LR_GRID)
    best = max(rec["trials"], key=lambda t: (t["value"], -t["lr"]))
    assert rec["chosen"] == best["lr"] and rec["criterion"] == "loss"
    for t in rec["trials"]:                               # each trial's value is its best validation epoch
        assert (out / "lr_search" / f"lr_{t['lr']:g}" / "seed_0" / "trial.json").is_file()
    assert f"lr search: chose {rec['chosen']:g}" in stdout
    for s in (0, 1):
        assert (out / f"seed_{s}" / "metrics.json").is_file()
    trained = json.loads((out / "metrics.json").read_text())
    agg = _quiet(run_evaluation, str(out))                # evaluate reads the chosen rate back
    assert agg["test"]["macro_f1"]["mean"] == pytest.approx(trained["test"]["macro_f1"]["mean"], abs=1e-9)
    r = run_cli("train", "--task", "csv", "--labels", str(cohort / "labels.csv"), "--features",
                str(cohort / "features"), "--out", str(tmp_path / "bad"), "--lr", "fast")
    assert r.returncode == 2 and "--lr fast" in r.stderr and "auto" in r.stderr, r.stderr


def test_ncmi_running_class_means_come_from_the_training_pass(cohort, tmp_path):
    """--ncmi-means running: each epoch's class means use the P the training pass produced (one per
    training bag), saving the eval pass; the final scores use the exact pass either way."""
    from wsi_ncmi.tasks import load_task
    from wsi_ncmi.train.data import BagStore, FeatureSource
    from wsi_ncmi.train.trainer import Trainer

    cfg = TrainConfig(task="csv", labels=str(cohort / "labels.csv"), features=str(cohort / "features"),
                      out=str(tmp_path / "r"), loss="ncmi", epochs=1, progress=False).validate()
    assert cfg.ncmi_means == "running"
    task = load_task("csv", cfg.labels)
    store = BagStore(FeatureSource(cfg.features), [s.slide_id for s in task.slides], 1.0)
    t = Trainer(cfg, task, store, 0, tmp_path / "r")
    _quiet(t.train_epoch, 0)
    ref = t.train_reference()
    n = len(t.train_set)
    assert ref["p"].shape[0] == n and sorted(ref["y"].tolist()) == sorted(r.label for r in t.train_set)
    assert abs(float(ref["p"].sum(1).mean()) - 1.0) < 1e-5
    exact = TrainConfig(**{**cfg.to_dict(), "ncmi_means": "exact"})
    t.cfg = exact
    assert "ids" in t.train_reference()                   # the eval pass over the training set
