"""Training on generated bags written as real HDF5 files: learning, NCMI diagnostics, resume."""

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.mil.models import MODELS
from wsi_ncmi.mil.synthetic import make_cohort
from wsi_ncmi.store.zarr_cache import pack_features
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.data import FeatureSource
from wsi_ncmi.train.metrics import macro_f1
from wsi_ncmi.train.run import run_evaluation, run_training

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # label = number of "tumour" instances (0 / 1-3 / 4-15 / 16+), like negative/ITC/micro/macro
    return make_cohort(tmp_path_factory.mktemp("bags"), n_slides=64, dim=16, bag_size=(40, 80), separation=6.0)


def _cfg(cohort, out, **kw):
    base = dict(task="csv", labels=str(cohort / "labels.csv"), features=str(cohort / "features"), out=str(out),
                epochs=12, lr=1e-3, progress=False, bootstrap=100)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(fn, *a):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a)


@pytest.mark.parametrize("loss", ["ce", "ncmi"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_aggregator_learns_with_ce_and_ncmi(cohort, tmp_path, model, loss):
    # every aggregator and both losses at the default recipe (lr 1e-3, selection on validation NLL)
    agg = _quiet(run_training, _cfg(cohort, tmp_path / "run", model=model, loss=loss, lr=TrainConfig().lr, epochs=15))
    # chance is 0.25 balanced accuracy on 4 balanced classes; 12 val + 12 test slides. The bar is twice
    # chance: at NCMI's T = 0.03 TransMIL reached 0.58 (7 of 12) on validation here with 2 threads, 0.75
    # with 1, against 0.75-0.83 at T = 0.1 (README, NCMI temperature: synthetic bags favour a higher T)
    val, test = agg["val"]["balanced_accuracy"]["mean"], agg["test"]["balanced_accuracy"]["mean"]
    assert val >= 0.5 and test >= 0.5, (val, test)


def test_validation_ncmi_falls_as_accuracy_rises(cohort, tmp_path):
    # Each at a learning rate where it learns. At its defaults NCMI reaches its best validation
    # accuracy on this small cohort by epoch 2 and then only wobbles, leaving no trajectory to
    # correlate; the former settings (features as extracted, T = 0.3, the method's centre and
    # separation) learn it over the 15 epochs.
    slow = dict(feature_norm="none", ncmi_temperature=0.3, ncmi_centre="ema", ncmi_separation="mean")
    for loss, lr, kw in (("ce", 1e-3, {}), ("ncmi", 2e-4, slow)):
        _quiet(run_training, _cfg(cohort, tmp_path / loss, loss=loss, lr=lr, epochs=15, patience=20, **kw))
        with open(tmp_path / loss / "seed_0" / "history.csv") as fh:
            rows = list(csv.DictReader(fh))
        acc = np.array([float(r["val_accuracy"]) for r in rows])
        ncmi = np.array([float(r["val_ncmi"]) for r in rows])
        assert acc[-3:].mean() > acc[:2].mean() and ncmi[-3:].mean() < ncmi[:2].mean(), loss
        assert np.corrcoef(acc, ncmi)[0, 1] < -0.3, loss


def test_run_folder_contents(cohort, tmp_path):
    out = tmp_path / "run"
    agg = _quiet(run_training, _cfg(cohort, out, seeds=2, epochs=4, model="abmil", loss="ncmi"))
    assert agg["seeds"] == [0, 1] and set(agg["test"]) >= {"macro_f1", "auc", "balanced_accuracy", "ncmi"}
    for f in ("config.yaml", "metrics.md", "metrics.json"):
        assert (out / f).is_file()
    s0 = out / "seed_0"
    for f in ("best.pt", "last.pt", "history.csv", "metrics.json", "curves.png", "test_confusion_roc.png",
              "predictions_train.csv", "predictions_val.csv", "predictions_test.csv"):
        assert (s0 / f).is_file(), f
    m = json.loads((s0 / "metrics.json").read_text())
    t = m["test"]
    assert t["ci95"]["macro_f1"][0] <= t["macro_f1"] <= t["ci95"]["macro_f1"][1]
    assert 0 < m["val"]["score_temperature"] and len(t["per_class_f1"]) == 4
    with open(s0 / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "label", "pred", "p_0", "p_1", "p_2", "p_3",
                             "logp_0", "logp_1", "logp_2", "logp_3", "attention_entropy"]
    assert all(abs(sum(float(r[f"p_{k}"]) for k in range(4)) - 1) < 1e-4 for r in rows)
    assert all(abs(np.exp(float(r[f"logp_{k}"])) - float(r[f"p_{k}"])) < 1e-8 for r in rows for k in range(4))
    assert "± " in (out / "metrics.md").read_text()
    # NCMI's prediction rule (--ncmi-predict auto): chosen per seed, recorded, and what the CSV's pred follows
    assert agg["ncmi_predict"] == [json.loads((out / f"seed_{s}" / "metrics.json").read_text())["ncmi_predict"]
                                   for s in (0, 1)] and set(agg["ncmi_predict"]) <= {"nearest", "bayes"}
    assert "NCMI prediction rule per seed (chosen on validation macro-F1): seed 0 " in (out / "metrics.md").read_text()
    pred = lambda d, sp: [r["pred"] for r in csv.DictReader(open(d / f"predictions_{sp}.csv"))]   # noqa: E731
    by_rule = {}
    for rule in ("nearest", "bayes"):
        _quiet(run_evaluation, out, None, None, None, rule)
        by_rule[rule] = {(s, sp): pred(out / "evaluate" / f"seed_{s}", sp) for s in (0, 1) for sp in ("val", "test")}
    for s, rule in enumerate(agg["ncmi_predict"]):
        assert all(pred(out / f"seed_{s}", sp) == by_rule[rule][(s, sp)] for sp in ("val", "test"))
        f1 = {r: macro_f1([int(x["label"]) for x in csv.DictReader(open(out / f"seed_{s}" / "predictions_val.csv"))],
                          [int(v) for v in by_rule[r][(s, "val")]]) for r in by_rule}
        assert rule == ("bayes" if f1["bayes"] > f1["nearest"] else "nearest")     # chosen on validation


def test_ncmi_predict_bayes_predicts_by_each_class_spread_and_the_csv_pools_it(cohort, tmp_path):
    import torch

    from wsi_ncmi.losses.ncmi import centroid_log_scores
    from wsi_ncmi.store.h5 import read_feature_file
    from wsi_ncmi.train.inference import load_run_model

    out = tmp_path / "run"
    agg = _quiet(run_training, _cfg(cohort, out, epochs=3, loss="ncmi", ncmi_predict="bayes"))
    assert agg["ncmi_predict"] == ["bayes"]
    with open(out / "seed_0" / "predictions_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    rm = load_run_model(out, 0, 16)
    with torch.no_grad():
        p = torch.cat([rm.scorer_inputs(rm.model(torch.from_numpy(
            read_feature_file(cohort / "features" / f"{r['slide_id']}.h5").features).float()[None]))[1] for r in rows])
    sc = rm.scorer
    per_class = centroid_log_scores(p, sc.qbar, sc.spread, sc.log_prior)[0]
    pooled = centroid_log_scores(p, sc.qbar, sc.pooled_spread(), sc.log_prior, sc.tau)[0]
    assert [int(r["pred"]) for r in rows] == per_class.argmax(1).tolist()
    written = np.array([[float(r[f"logp_{k}"]) for k in range(4)] for r in rows])
    np.testing.assert_allclose(written, pooled.numpy(), atol=1e-6)
    assert "(--ncmi-predict bayes): seed 0 bayes" in (out / "metrics.md").read_text()
    # evaluate re-scores the same model by another rule, without training
    again = _quiet(run_evaluation, out, None, None, None, "nearest")
    assert again["ncmi_predict"] == ["nearest"] and again["test"]["auc"]["mean"] == pytest.approx(agg["test"]["auc"]["mean"])
    assert "(--ncmi-predict nearest): seed 0 nearest" in (out / "evaluate" / "metrics.md").read_text()
    # a run scored before the pooled score (no score_spread in scoring.pt) keeps its per-class scores
    # when evaluate re-scores it, so evaluate, predict and heatmap still agree
    from wsi_ncmi.train.checkpoint import load_checkpoint, save_checkpoint
    from wsi_ncmi.train.scoring import Scorer

    legacy = {k: v for k, v in load_checkpoint(out / "seed_0" / "scoring.pt").items() if k != "score_spread"}
    save_checkpoint(legacy, out / "seed_0" / "scoring.pt")
    _quiet(run_evaluation, out, None, None, None, "bayes")
    refit = Scorer.from_state(load_checkpoint(out / "evaluate" / "seed_0" / "scoring.pt"))
    assert refit.score_spread == "class"
    with open(out / "evaluate" / "seed_0" / "predictions_test.csv") as fh:
        again = np.array([[float(r[f"logp_{k}"]) for k in range(4)] for r in csv.DictReader(fh)])
    np.testing.assert_allclose(again, centroid_log_scores(p, sc.qbar, sc.spread, sc.log_prior, refit.tau)[0].numpy(),
                               atol=1e-6)
    assert not np.allclose(again, written, atol=1e-3)       # the per-class scores, not the pooled ones


def test_evaluate_rescores_to_the_same_numbers(cohort, tmp_path):
    out = tmp_path / "run"
    _quiet(run_training, _cfg(cohort, out, epochs=4))
    agg = _quiet(run_evaluation, out)
    first = json.loads((out / "seed_0" / "metrics.json").read_text())["test"]
    again = json.loads((out / "evaluate" / "seed_0" / "metrics.json").read_text())["test"]
    assert again["macro_f1"] == first["macro_f1"] and again["auc"] == pytest.approx(first["auc"])
    assert agg["test"]["macro_f1"]["mean"] == first["macro_f1"]


def test_feature_norm_uses_training_statistics_and_travels_with_the_checkpoint(cohort, tmp_path):
    """--feature-norm zscore: the training split's per-dimension mean/std, saved in best.pt, applied by
    evaluate and by a member loaded for predict/heatmap exactly as in training; validation and test
    bags never enter the statistics."""
    import torch

    from wsi_ncmi.predict.members import load_members, score_bag
    from wsi_ncmi.store.h5 import read_feature_file

    rows = list(csv.DictReader(open(cohort / "labels.csv")))
    bags = {r["slide_id"]: np.asarray(read_feature_file(cohort / "features" / f"{r['slide_id']}.h5").features,
                                      np.float64) for r in rows}
    train = np.concatenate([bags[r["slide_id"]] for r in rows if r["split"] == "train"])
    everything = np.concatenate(list(bags.values()))
    out = tmp_path / "run"
    _quiet(run_training, _cfg(cohort, out, epochs=4, loss="ce", feature_norm="zscore"))
    st = torch.load(out / "seed_0" / "best.pt", map_location="cpu", weights_only=False)["model"]
    np.testing.assert_allclose(st["input_norm.mean"].numpy(), train.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(1 / st["input_norm.inv_std"].numpy(), train.std(0), rtol=1e-5)
    assert not np.allclose(train.mean(0), everything.mean(0), atol=1e-3)   # the check can tell the splits apart
    agg = _quiet(run_evaluation, out)
    first = json.loads((out / "seed_0" / "metrics.json").read_text())["test"]
    assert agg["test"]["macro_f1"]["mean"] == first["macro_f1"]
    member = load_members(out, 16)
    assert member[0].model.model.input_norm.active
    with open(out / "seed_0" / "predictions_test.csv") as fh:
        for r in list(csv.DictReader(fh))[:5]:
            p = score_bag(member, torch.from_numpy(bags[r["slide_id"]].astype(np.float32))).mean
            np.testing.assert_allclose(p, [float(r[f"p_{k}"]) for k in range(4)], atol=1e-5)
    # the same weights without the statistics score differently: the normalisation is really applied
    member[0].model.model.input_norm.set_stats(torch.zeros(16), torch.ones(16))
    x = torch.from_numpy(bags[rows[0]["slide_id"]].astype(np.float32))
    assert not np.allclose(score_bag(member, x).mean, score_bag(load_members(out, 16), x).mean, atol=1e-4)


def test_feature_stats_merge_bags_and_chunks_exactly(tmp_path, monkeypatch):
    """Chan's merge over bags and row chunks equals numpy on the concatenation; a constant
    dimension comes out exactly constant (weight 0), not with rounding residue and a 1e17 weight."""
    import h5py

    from wsi_ncmi.train import data
    from wsi_ncmi.train.data import BagStore

    rng = np.random.default_rng(0)
    (tmp_path / "f").mkdir()
    bags = []
    for i, n in enumerate((7, 40, 3, 25)):
        x = (rng.normal(size=(n, 5)) * [1, 10, 1e-3, 1, 1] + [0, 500, 2, 0, 0]).astype(np.float32)
        x[:, 3] = 0.3                                                     # constant, non-zero
        bags.append(x)
        with h5py.File(tmp_path / "f" / f"b{i}.h5", "w") as f:
            f["features"], f["coords"] = x, np.zeros((n, 2), np.int64)
    monkeypatch.setattr(data, "STATS_ROWS", 6)                            # several chunks per bag
    store = BagStore(FeatureSource(str(tmp_path / "f")), [f"b{i}" for i in range(4)])
    mean, std = store.feature_stats([f"b{i}" for i in range(4)])
    allx = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std[[0, 1, 2, 4]], allx.std(0)[[0, 1, 2, 4]], rtol=1e-9)
    assert std[3] == 0.0


def test_checkpoints_from_before_feature_norm_load_as_identity():
    import torch

    from wsi_ncmi.mil.models import create_mil_model
    from wsi_ncmi.train.checkpoint import load_state

    torch.manual_seed(0)
    old = create_mil_model("abmil", 8, 4).eval()
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("input_norm.")}
    new = create_mil_model("abmil", 8, 4).eval()
    new.input_norm.set_stats(torch.ones(8), torch.full((8,), 2.0))
    load_state(new, state, "old.pt")
    x = torch.randn(1, 30, 8)
    assert not new.input_norm.active
    torch.testing.assert_close(new(x).logits, old(x).logits)
    # and a fitted model standardises its input before its first layer, constant dimensions getting weight 0
    new.input_norm.set_stats(torch.ones(8), torch.tensor([2.0] * 7 + [0.0]))
    ref = x.clone()
    ref[..., :7] = (ref[..., :7] - 1) / 2
    ref[..., 7] = 0
    torch.testing.assert_close(new(x).logits, old(ref).logits)
    # padded rows stay zero after standardising (TransMIL's positional convolution sees them), and a
    # padded batch scores its bags as they score alone
    from wsi_ncmi.mil.models.base import _normalise_input

    pad = torch.cat([x, torch.zeros(1, 10, 8)], 1)
    mask = torch.cat([torch.ones(1, 30, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool)], 1)
    seen = _normalise_input(new, (pad, mask), {})[0][0]
    assert (seen[:, 30:] == 0).all() and (seen[:, :30, :7] != 0).any()
    torch.testing.assert_close(new(pad, mask).logits, new(x).logits)
    bad = {**new.state_dict()}
    del bad["input_norm.inv_std"]
    with pytest.raises(WsiNcmiError, match="input_norm.mean and input_norm.inv_std must come together"):
        load_state(create_mil_model("abmil", 8, 4), bad, "half.pt")


def test_patch_dropout_trains_on_a_fresh_share_of_each_bag_and_leaves_other_runs_unchanged():
    import torch

    from wsi_ncmi.train.data import collate

    bag = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    seen = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, mask = collate([bag], "cpu", 0, gen, patch_dropout=0.7)
        rows = x[0, :, 0].numpy() / 3
        assert mask is None and len(rows) == 15                           # ceil(0.3 * 50)
        assert (np.diff(rows) > 0).all() and np.isin(rows, np.arange(50)).all()   # a subset, in bag order
        seen.append(rows)
    assert not np.array_equal(*seen)                                      # drawn afresh each time
    x, _ = collate([bag], "cpu", 8, gen, patch_dropout=0.5)               # --max-patches caps after the share
    assert x.shape[1] == 8
    x, mask = collate([bag, bag[:4]], "cpu", 0, gen, patch_dropout=0.5)  # padded batches: each bag its own share
    assert mask.sum(1).tolist() == [25, 2]
    assert collate([bag], "cpu", 0, gen, patch_dropout=1 - 1e-12)[0].shape[1] == 1   # never an empty bag
    # off (the default): whole bags, and the generator is not drawn from, so earlier runs reproduce
    before = gen.get_state()
    torch.testing.assert_close(collate([bag], "cpu", 0, gen)[0][0], torch.from_numpy(bag))
    assert torch.equal(gen.get_state(), before)


def test_training_steps_see_the_dropped_share_and_evaluation_whole_bags(cohort, tmp_path, monkeypatch):
    import math

    import h5py

    from wsi_ncmi.mil.models.abmil import ABMIL

    seen, forward = [], ABMIL.forward

    def spy(self, x, mask=None, y=None):
        seen.append((self.training, x.shape[1]))
        return forward(self, x, mask, y)

    monkeypatch.setattr(ABMIL, "forward", spy)
    _quiet(run_training, _cfg(cohort, tmp_path / "pd", epochs=1, loss="ce", patch_dropout=0.5))
    length = {}
    for row in csv.DictReader(open(cohort / "labels.csv")):
        with h5py.File(cohort / "features" / f"{row['slide_id']}.h5", "r") as f:
            length.setdefault(row["split"], []).append(len(f["features"]))
    assert sorted(n for training, n in seen if training) == sorted(math.ceil(n / 2) for n in length["train"])
    assert set(length["val"]) | set(length["test"]) <= {n for training, n in seen if not training}


def test_ncmi_class_means_come_from_whole_bags_under_patch_dropout(cohort, tmp_path):
    """``--ncmi-means running`` reuses the training pass's outputs; under --patch-dropout that pass sees
    part-bags, so the exact pass over whole bags is used: every epoch's validation then matches
    ``exact`` to the last digit (and without patch dropout the two differ, so the check can fail)."""
    def val(name, **kw):
        _quiet(run_training, _cfg(cohort, tmp_path / name, epochs=3, min_epochs=3, loss="ncmi", **kw))
        rows = list(csv.DictReader(open(tmp_path / name / "seed_0" / "history.csv")))
        return [[r[k] for k in r if k.startswith("val_")] for r in rows]

    assert val("pd_running", patch_dropout=0.5) == val("pd_exact", patch_dropout=0.5, ncmi_means="exact")
    assert val("running") != val("exact", ncmi_means="exact")


def test_killed_training_resumes_to_the_same_result(cohort, tmp_path):
    args = ["train", "--task", "csv", "--labels", str(cohort / "labels.csv"), "--features", str(cohort / "features"),
            "--epochs", "6", "--patience", "20", "--lr", "1e-3", "--bootstrap", "50", "-q"]
    full = run_cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "wsi_ncmi", *args, "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if "epoch   3" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert not (out / "metrics.md").exists()
    res = run_cli(*args, "--out", str(out), "--resume")
    assert res.returncode == 0 and "resuming after epoch 3" in res.stdout, res.stdout + res.stderr
    a = (tmp_path / "full" / "seed_0" / "predictions_test.csv").read_text()
    b = (out / "seed_0" / "predictions_test.csv").read_text()
    assert a == b
    ha = (tmp_path / "full" / "seed_0" / "history.csv").read_text().splitlines()
    hb = (out / "seed_0" / "history.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:2] + r.split(",")[3:]) for r in rows]   # drop timing column
    assert strip(ha) == strip(hb)


def test_zarr_cache_is_used_and_matches(cohort, tmp_path):
    import shutil

    feats = tmp_path / "features"
    shutil.copytree(cohort / "features", feats)
    pack_features(feats, progress=False)
    src = FeatureSource(feats)
    assert src.kind == "zarr"
    h5 = FeatureSource(cohort / "features")
    assert np.array_equal(src.load("bag_0003"), h5.load("bag_0003").astype(np.float16))
    (feats / "bag_0003.h5").touch()   # a changed source file makes the cache stale: fall back to HDF5
    with contextlib.redirect_stdout(io.StringIO()) as s:
        assert FeatureSource(feats).kind == "hdf5"
    assert "wsi-ncmi pack" in s.getvalue()


def test_missing_features_are_reported_or_skipped_on_request(cohort, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text((cohort / "labels.csv").read_text() + "ghost_1,0,train\nghost_2,1,test\n")
    cfg = _cfg(cohort, tmp_path / "r", epochs=2)
    cfg.labels = str(labels)
    with pytest.raises(WsiNcmiError, match=r"2 of 66 slides .* have no features \(first: ghost_1, ghost_2\).*--allow-missing"):
        run_training(cfg)
    cfg.allow_missing = True
    agg = _quiet(run_training, cfg)
    assert "ghost_1" in agg["notes"][0]


def test_feature_dimension_mismatch_fails_fast(cohort, tmp_path):
    import shutil

    from wsi_ncmi.store import FeatureWriter

    feats = tmp_path / "f"
    shutil.copytree(cohort / "features", feats)
    w = FeatureWriter(feats / "bag_0005.h5", feats / ".p", np.zeros((3, 2)), 7, "float32")
    w.write(0, np.zeros((3, 7), np.float32))
    w.commit()
    cfg = _cfg(cohort, tmp_path / "r", epochs=1)
    cfg.features = str(feats)
    with pytest.raises(WsiNcmiError, match=r"1 of 64 feature files are unusable: .*bag_0005.h5: dimension 7, not the cohort.s 16"):
        _quiet(run_training, cfg)


def test_train_cli_errors_and_help():
    res = run_cli("train", "--task", "camelyon17", "--features", "nowhere")
    assert res.returncode == 2 and "needs --labels stage_labels.csv" in res.stderr
    res = run_cli("train", "--loss", "hinge")
    assert res.returncode == 2 and "--loss hinge: choose one of" in res.stderr
    res = run_cli("train", "--feature-norm", "minmax")
    assert res.returncode == 2 and "--feature-norm minmax: choose none or zscore" in res.stderr
    res = run_cli("train", "--ncmi-predict", "argmax")
    assert res.returncode == 2 and "--ncmi-predict argmax: choose auto, nearest or bayes" in res.stderr
    res = run_cli("train", "--patch-dropout", "1")
    assert res.returncode == 2 and "--patch-dropout 1.0: the share of patches dropped must be in [0, 1)" in res.stderr
    assert "ncmi" in run_cli("train", "--help").stdout


def test_train_configs_are_valid():
    for f in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        TrainConfig.from_sources(str(f))


def test_camelyon17_run_reports_patient_pn_kappa(tmp_path):
    """Node bags named as in the challenge, labels in the official stage_labels.csv format."""
    from wsi_ncmi.mil.synthetic import make_camelyon17_cohort
    from wsi_ncmi.tasks.camelyon17 import CLASSES

    make_camelyon17_cohort(tmp_path, dim=8, bag_size=50)
    feats = tmp_path / "features"
    lines = (tmp_path / "stage_labels.csv").read_text().splitlines()
    cfg = TrainConfig(task="camelyon17", labels=str(tmp_path / "stage_labels.csv"), features=str(feats),
                      out=str(tmp_path / "run"), epochs=3, lr=1e-3, progress=False, bootstrap=20, loss="ce")
    agg = _quiet(run_training, cfg)
    m = json.loads((tmp_path / "run" / "seed_0" / "metrics.json").read_text())
    assert m["test"]["patient_pn"]["patients"] == 10 and -1 <= m["test"]["patient_pn"]["qwk"] <= 1
    assert "patient_qwk" in agg["test"] and "pN-stage" in (tmp_path / "run" / "metrics.md").read_text()
    assert agg["counts"]["test"] == [sum(1 for l in lines[1:] if "node" in l and int(l[8:11]) >= 60 and l.endswith(c))
                                     for c in CLASSES]


def test_bad_feature_files_are_all_named_before_training(cohort, tmp_path):
    import shutil

    import h5py

    feats = tmp_path / "f"
    shutil.copytree(cohort / "features", feats)
    with h5py.File(feats / "bag_0000.h5", "w") as f:     # the first file: another encoder's dimension, CLAM
        f["features"] = np.zeros((3, 8), np.float32)       # style; it must not make the 63 others look bad
    with h5py.File(feats / "bag_0001.h5", "r+") as f:   # a corrupt bag the writer would have refused
        f["features"][0, 0] = np.inf
    (feats / "bag_0009.h5").write_bytes(b"not hdf5")
    cfg = _cfg(cohort, tmp_path / "r", epochs=2, loss="ce")
    cfg.features = str(feats)
    # NaN/inf features are named up front, never reported as a learning-rate problem
    with pytest.raises(WsiNcmiError, match=r"3 of 64 feature files are unusable: .*bag_0000.h5: dimension 8, not the "
                                           r"cohort's 16; .*bag_0001.h5: 1 of \d+ patches hold NaN or inf; "
                                           r".*bag_0009.h5: not a readable HDF5"):
        _quiet(run_training, cfg)
    assert not (tmp_path / "r" / "seed_0").exists()


def test_measurement_cohorts_are_plain_clam_files_of_real_rows(tmp_path):
    # the held-out style cohorts the recipe is measured on: real scikit-learn rows, unscaled, no attributes
    import h5py
    from sklearn.datasets import load_wine

    from wsi_ncmi.mil.synthetic import make_measurement_cohort
    from wsi_ncmi.tasks import load_task

    out = make_measurement_cohort(tmp_path / "wine", "wine", bags=(8, 4, 4))
    t = load_task("csv", labels=str(out / "labels.csv"))
    assert [len(t.split(s)) for s in ("train", "val", "test")] == [8, 4, 4] and t.counts()["train"] == [2, 2, 2, 2]
    wine = load_wine()
    target_of = {tuple(r): int(c) for r, c in zip(wine.data.astype(np.float32), wine.target)}
    for s in t.slides:
        with h5py.File(out / "features" / f"{s.slide_id}.h5") as f:
            assert set(f) == {"features", "coords"} and not f.attrs
            x = f["features"][()]
        assert 24 <= len(x) <= 40 and all(tuple(r) in target_of for r in x)
        positives = sum(target_of[tuple(r)] == 2 for r in x)          # class 2 rows are the "positive" ones
        lo, hi = ((0, 0), (1, 2), (3, 6), (7, 14))[s.label]
        assert lo <= positives <= hi


@pytest.mark.parametrize("saved_fused", [True, False])
def test_optimizer_state_resumes_across_implementations(saved_fused):
    """A checkpoint's optimizer state (fused or not) resumes into this process's optimizer with its
    moments and step count, and this process's implementation: a run from before the fused kernel
    gets it, and a device without one never asks for it."""
    import copy

    import torch

    from wsi_ncmi.train.trainer import fused_if_possible, load_optimizer_state

    def make(fused):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 3))
        return p, (fused_if_possible(torch.optim.AdamW, [p], lr=0.1) if fused else torch.optim.AdamW([p], lr=0.1))

    p0, opt0 = make(saved_fused)
    for _ in range(3):
        opt0.zero_grad()
        (p0 ** 2).sum().backward()
        opt0.step()
    p1, opt1 = make(not saved_fused)
    with torch.no_grad():
        p1.copy_(p0)
    load_optimizer_state(opt1, copy.deepcopy(opt0.state_dict()))   # as from a file: no shared tensors
    assert opt1.param_groups[0].get("fused") == opt1.defaults.get("fused")
    assert torch.equal(opt1.state[p1]["exp_avg"], opt0.state[p0]["exp_avg"])
    for p, opt in ((p0, opt0), (p1, opt1)):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert float(opt1.state[p1]["step"]) == 4 and torch.allclose(p1, p0, atol=1e-6)
