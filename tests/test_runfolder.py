"""Training runs that never lose, mix or misreport work: every case of the run-folder probe, on
real files (generated HDF5 cohorts, real checkpoints, a real pyramidal TIFF), through the real CLI
entry point (``wsi_ncmi.cli.main``: a traceback fails the test), a real subprocess and a real kill -9."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_ncmi.cli import main
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.mil.synthetic import make_cohort
from wsi_ncmi.store import FeatureWriter
from wsi_ncmi.store.zarr_cache import pack_features
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.data import FeatureSource
from wsi_ncmi.train.padding import padding_warning
from wsi_ncmi.train.run import prepare, run_training

from conftest import make_tissue_slide

SLIDE_MPP = 2.0


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _train_args(c: Path, out: Path, *extra) -> list:
    return ["train", "--task", "csv", "--labels", c / "labels.csv", "--features", c / "features", "--out", out,
            "--epochs", "2", "--lr", "1e-3", "--bootstrap", "10", "-q", *extra]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 small bags; bag_0000's file records a real slide, as extraction does."""
    root = tmp_path_factory.mktemp("runfolder")
    c = make_cohort(root / "c", n_slides=24, dim=8, bag_size=(10, 20), separation=6.0)
    n = len(h5py.File(c / "features" / "bag_0000.h5", "r")["coords"])
    slide = make_tissue_slide(root / "slides" / "bag_0000.tiff", SLIDE_MPP, [(100, 100, n * 512 - 200, 500)],
                              width_um=n * 512 + 200, height_um=700)
    with h5py.File(c / "features" / "bag_0000.h5", "r+") as f:
        f.attrs.update({"slide_path": str(slide), "slide_size_bytes": slide.stat().st_size, "mpp_x": SLIDE_MPP,
                        "level0_width": int(round((n * 512 + 200) / SLIDE_MPP)),
                        "level0_height": int(round(700 / SLIDE_MPP)), "patch_size_level0_x": 256})
    make_tissue_slide(root / "other" / "bag_0000.tiff", SLIDE_MPP, [(50, 50, 300, 300)], width_um=800,
                      height_um=600, seed=3)   # same name, another slide
    return c


@pytest.fixture(scope="module")
def trained(cohort):
    """A finished one-seed NCMI run (copied by the tests that damage or change it)."""
    rc, _, err = cli(*_train_args(cohort, cohort.parent / "run"))
    assert rc == 0, err
    return cohort.parent / "run"


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---- pack ------------------------------------------------------------------------------------------
def test_pack_never_deletes_user_data(cohort, trained, tmp_path):
    feats = shutil.copytree(cohort / "features", tmp_path / "f")
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("my notes")
    (tmp_path / "file.zarr").write_text("a file")
    before_f, before_run = _snapshot(feats), _snapshot(trained)
    for target, why in ((feats, "ending in .zarr"), (trained, "ending in .zarr"), (feats / "bag_0001.h5", ".zarr"),
                        (tmp_path / "mine.zarr", "not a cache made by `wsi-ncmi pack`"), (tmp_path / "file.zarr", "a file")):
        rc, _, err = cli("pack", feats, target)
        assert rc == 2 and why in err and str(target) in err, err
    assert _snapshot(feats) == before_f and _snapshot(trained) == before_run
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "my notes"
    assert not list(tmp_path.rglob("*.zarr.partial"))
    for _ in range(2):          # a cache of its own is replaced
        rc, out, err = cli("pack", feats)
        assert rc == 0 and "cohort.zarr" in out, err
    assert FeatureSource(feats).kind == "zarr" and _snapshot(feats / "cohort.zarr")


def test_pack_keeps_float64_values_finite_and_refuses_nan(tmp_path):
    feats = tmp_path / "f"
    big = np.array([[1e5, -7e4, 3.0], [0.5, 2e6, -1.0]])
    for sid, x in (("a", big), ("b", np.ones((3, 3)))):
        w = FeatureWriter(feats / f"{sid}.h5", feats / ".p", np.zeros((len(x), 2)), 3, "float64")
        w.write(0, x)
        w.commit()
    rc, out, err = cli("pack", feats)
    assert rc == 0 and "float32" in out, err
    bag = FeatureSource(feats).load("a")
    assert bag.dtype == np.float32 and np.isfinite(bag).all() and np.array_equal(bag, big.astype(np.float32))
    with h5py.File(feats / "b.h5", "r+") as f:     # a bag the extraction's writer would have refused
        f["features"][1, 1] = np.nan
    rc, _, err = cli("pack", feats, tmp_path / "new.zarr")
    assert rc == 2 and "b.h5: features contain NaN" in err, err
    assert not (tmp_path / "new.zarr").exists() and not list(tmp_path.glob("*.partial"))


def test_a_stale_cache_passed_directly_is_refused(cohort, tmp_path):
    feats = shutil.copytree(cohort / "features", tmp_path / "f")
    cache = pack_features(feats, progress=False)
    assert FeatureSource(cache).kind == "zarr"
    os.utime(feats / "bag_0003.h5", (1, 1))           # a source file changed after packing
    with pytest.raises(WsiNcmiError, match=r"cohort.zarr: older than the .h5 files .*wsi-ncmi pack"):
        FeatureSource(cache)
    moved = shutil.copytree(cache, tmp_path / "node" / "cohort.zarr")   # away from its .h5 files: used as it is
    shutil.rmtree(feats)
    assert FeatureSource(moved).kind == "zarr"


# ---- run identity ------------------------------------------------------------------------------------
def test_a_run_folder_refuses_other_settings_and_overwrite_replaces_it(cohort, trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    cases = [(["--loss", "ce"], "holds a run of other settings (loss (ncmi -> ce))"),
             (["--loss", "ce", "--resume"], "--resume with changed settings: loss (ncmi -> ce)"),
             (["--model", "transmil", "--resume"], "model (abmil -> transmil)"),
             (["--lr", "3e-4", "--epochs", "3", "--resume"], "lr (0.001 -> 0.0003)"),
             ([], "already holds this run (seed_0 finished); pass --resume")]
    errors = []
    for extra, message in cases:
        rc, _, err = cli(*_train_args(cohort, run, *extra))
        assert rc == 2 and message in err and "--overwrite" in err, (extra, err)
        errors.append(err)
    assert _snapshot(run) == before                  # nothing written, nothing removed
    assert f"--config {run / 'config.yaml'} --resume" in errors[3]
    rc, out, err = cli("train", "--config", run / "config.yaml", "--resume")   # what the message says
    assert rc == 0 and "seed 0: already finished, kept" in out, err
    rc, out, err = cli(*_train_args(cohort, run, "--seeds", "2", "--resume", "--epochs", "3"))
    assert rc == 0 and "epochs 2 -> 3" in out and "seed 0: already finished, kept" in out, err
    assert (run / "seed_0" / "best.pt").read_bytes() == (trained / "seed_0" / "best.pt").read_bytes()
    rc, out, err = cli(*_train_args(cohort, run, "--loss", "ce", "--overwrite"))
    assert rc == 0 and "--overwrite: removed the previous run" in out, err
    agg = json.loads((run / "metrics.json").read_text())
    assert agg["loss"] == "ce" and agg["seeds"] == [0] and not (run / "seed_1").exists()
    assert json.loads((run / "run.json").read_text())["identity"]["loss"] == "ce"
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes
    assert "overwrite: false" in (run / "config.yaml").read_text()
    rc, _, err = cli("evaluate", run, "--ncmi-predict", "nearest")
    assert rc == 2 and "trained with ce" in err and "applies to ncmi runs only" in err, err


def test_an_ncmi_run_from_before_ncmi_predict_keeps_its_nearest_mean_rule(cohort, trained, tmp_path):
    """Such a run's config.yaml and run.json lack ncmi_predict: it predicted by the nearest class mean,
    which is what evaluate and --resume take it to mean, not today's default (auto)."""
    import yaml

    run = _copy(trained, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["ncmi_predict"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    record = json.loads((run / "run.json").read_text())
    del record["identity"]["ncmi_predict"]
    (run / "run.json").write_text(json.dumps(record))
    rc, out, err = cli("evaluate", run)
    assert rc == 0, err
    assert json.loads((run / "evaluate" / "metrics.json").read_text())["ncmi_predict"] == ["nearest"]
    resume = ("train", "--config", run / "config.yaml", "--out", run, "--resume")   # config.yaml names the original
    rc, _, err = cli(*resume)
    assert rc == 2 and "ncmi_predict (nearest -> auto)" in err and "evaluate" in err, err
    assert f"--config {run / 'config.yaml'} --resume --ncmi-predict nearest`" in err
    rc, out, err = cli(*resume, "--ncmi-predict", "nearest")
    assert rc == 0 and "seed 0: already finished, kept" in out, err


def test_a_run_from_before_the_zscore_and_temperature_defaults_keeps_its_settings(cohort, trained, tmp_path):
    """Older versions saved ``ncmi_temperature: null`` (then T = 0.3) and, before --feature-norm, no
    feature_norm (features as extracted). Both are read as what they meant, not as today's defaults
    (0.03, zscore): evaluate scores with T = 0.3 and --resume names both changes. For a loss that never
    read the temperature, a null is no difference."""
    import yaml

    from wsi_ncmi.train.inference import load_member_model
    from wsi_ncmi.train.runfolder import differences, load_run_config

    run = _copy(trained, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["ncmi_temperature"] == 0.03 and saved["train"]["feature_norm"] == "zscore"
    saved["train"]["ncmi_temperature"] = None
    del saved["train"]["feature_norm"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    record = json.loads((run / "run.json").read_text())
    record["identity"]["ncmi_temperature"] = None
    del record["identity"]["feature_norm"]
    (run / "run.json").write_text(json.dumps(record))
    cfg = load_run_config(run)
    assert (cfg.ncmi_temperature, cfg.feature_norm) == (0.3, "none")
    in_dim = h5py.File(cohort / "features" / "bag_0001.h5", "r")["features"].shape[1]
    member = load_member_model(run, run / "seed_0", in_dim)
    assert member.objective.ncmi.temperature == 0.3 and member.cfg.feature_norm == "none"
    rc, _, err = cli("evaluate", run)
    assert rc == 0, err
    rc, _, err = cli(*_train_args(cohort, run, "--resume"))          # today's defaults: both differ
    assert rc == 2 and "feature_norm (none -> zscore)" in err and "ncmi_temperature (0.3 -> 0.03)" in err, err
    rc, _, err = cli("train", "--config", run / "config.yaml", "--out", run, "--resume")   # its config: T read as 0.3
    assert rc == 2 and "feature_norm (none -> zscore)" in err and "ncmi_temperature" not in err, err
    assert "--resume --feature-norm none`" in err
    ce = {"loss": "ce", "ncmi_temperature": None}
    assert differences(ce, {**ce, "ncmi_temperature": 0.03}) == []
    assert differences({**ce, "ncmi_temperature": 0.3}, {**ce, "ncmi_temperature": 0.03}) == []   # CE never read it
    # nor the NCMI settings whose defaults changed since: a CE run from before them still resumes
    now = {"loss": "ce", "ncmi_centre": "none", "ncmi_separation": "harmonic"}
    assert differences({"loss": "ce"}, now) == [] and differences({**now, "ncmi_centre": "ema"}, now) == []
    assert differences({"loss": "ncmi"}, {**now, "loss": "ncmi"}) == \
        ["ncmi_centre (ema -> none)", "ncmi_separation (mean -> harmonic)"]      # an NCMI run trained the method
    assert TrainConfig(loss="ce", ncmi_temperature=None).validate().ncmi_temperature == 0.03
    assert TrainConfig(loss="ncmi", ncmi_temperature="3e-2").validate().ncmi_temperature == 0.03   # YAML's 3e-2
    with pytest.raises(WsiNcmiError, match="--ncmi-temperature x: give a number"):
        TrainConfig(ncmi_temperature="x").validate()
    assert differences({**ce, "loss": "ncmi"}, {**ce, "loss": "ncmi", "ncmi_temperature": 0.03}) == \
        ["ncmi_temperature (0.3 -> 0.03)"]


def test_saved_config_resolves_the_settings_an_older_run_left_out(tmp_path):
    """A config.yaml from before --feature-norm, the temperature key and NCMI's centre and separation:
    its missing settings read as that version meant them (features as extracted, T 0.3 as a number,
    never the word ``auto``; the method's EMA centre and mean separation)."""
    import yaml

    from wsi_ncmi.train.config import saved_config

    for loss in ("ce", "ncmi"):
        old = TrainConfig(loss=loss).to_dict()
        del old["ncmi_temperature"], old["feature_norm"], old["ncmi_centre"], old["ncmi_separation"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": old}))
        cfg = saved_config(tmp_path / "config.yaml")
        assert (cfg.ncmi_temperature, cfg.feature_norm) == (0.3, "none"), loss
        assert (cfg.ncmi_centre, cfg.ncmi_separation) == ("ema", "mean"), loss


def test_out_must_be_a_writable_folder_that_is_a_run_or_empty(cohort, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "slides.txt").write_text("x")
    for out, message in ((tmp_path / "file", "a file, not a folder"), (tmp_path / "file" / "run", "cannot create"),
                         (tmp_path / "data", "not empty and not a wsi-ncmi run folder")):
        rc, _, err = cli(*_train_args(cohort, out, "--overwrite"))
        assert rc == 2 and message in err, err
    assert (tmp_path / "data" / "slides.txt").exists() and sorted(os.listdir(tmp_path / "data")) == ["slides.txt"]
    # a folder that merely holds a config.yaml (of another tool) and figures is not an old run: untouched
    mine = tmp_path / "mine"
    (mine / "heatmaps").mkdir(parents=True)
    (mine / "config.yaml").write_text("extract:\n  mpp: 0.5\n")
    (mine / "heatmaps" / "figure.png").write_bytes(b"png")
    (mine / "metrics.md").write_text("my notes")
    before = _snapshot(mine)
    rc, _, err = cli(*_train_args(cohort, mine))
    assert rc == 2 and "not a wsi-ncmi run folder" in err and _snapshot(mine) == before, err
    if os.geteuid() != 0:                            # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        rc, _, err = cli(*_train_args(cohort, ro / "run"))
        assert rc == 2 and "pass a writable --out" in err, err


def test_two_trainings_cannot_share_a_run_folder_and_kill_9_frees_it(cohort, tmp_path):
    out = tmp_path / "run"
    args = [str(a) for a in _train_args(cohort, out)]
    args[args.index("--epochs") + 1] = "100000"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "wsi_ncmi", *args, "--patience", "100000"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in p.stdout:
            if "epoch   1" in line:
                break
        assert p.poll() is None, "the first training ended early"
        rc, _, err = cli(*_train_args(cohort, out, "--resume"))
        assert rc == 2 and f"another training is writing this run folder (pid {p.pid}" in err, err
        rc, _, err = cli("evaluate", out)
        assert rc == 2 and "a training is writing this run folder" in err, err
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (out / ".train.lock").exists()            # left behind by kill -9 ...
    rc, stdout, err = cli(*_train_args(cohort, out, "--resume"))   # ... and taken over: its pid is gone
    assert rc == 0 and "resuming after epoch" in stdout, err
    assert not (out / ".train.lock").exists()


# ---- paths -------------------------------------------------------------------------------------------
def test_evaluate_finds_the_runs_own_files_from_anywhere(cohort, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(cohort / "labels.csv", proj / "labels.csv")
    shutil.copytree(cohort / "features", proj / "features")
    monkeypatch.chdir(proj)
    with contextlib.redirect_stdout(io.StringIO()):
        run_training(TrainConfig(task="csv", labels="labels.csv", features="features", out="runs/r", epochs=1,
                                 lr=1e-3, loss="ce", progress=False, bootstrap=10))
    run = proj / "runs" / "r"
    assert f"labels: {proj / 'labels.csv'}" in (run / "config.yaml").read_text()
    # elsewhere, files under the same names: a decoy label file with every label shifted
    other = tmp_path / "elsewhere"
    shutil.copytree(proj / "features", other / "features")
    rows = (proj / "labels.csv").read_text().splitlines()
    other.joinpath("labels.csv").write_text("\n".join([rows[0]] + [
        f"{r.split(',')[0]},{(int(r.split(',')[1]) + 1) % 4},{r.split(',')[2]}" for r in rows[1:]]) + "\n")
    monkeypatch.chdir(other)
    trained_test = json.loads((run / "seed_0" / "metrics.json").read_text())["test"]
    rc, _, err = cli("evaluate", run)
    assert rc == 0, err
    again = json.loads((run / "evaluate" / "seed_0" / "metrics.json").read_text())["test"]
    assert again["confusion"] == trained_test["confusion"] and again["auc"] == pytest.approx(trained_test["auc"])
    os.rename(proj / "labels.csv", proj / "moved.csv")
    rc, _, err = cli("evaluate", run)
    assert rc == 2 and "labels.csv: the labels of this run" in err and "pass --labels" in err, err
    rc, _, err = cli("evaluate", run, "--labels", proj / "moved.csv")
    assert rc == 0, err
    shutil.copy(other / "labels.csv", proj / "labels.csv")     # same name, other labels
    rc, _, err = cli("evaluate", run)
    assert rc == 2 and "not the label file this run was trained on" in err, err
    shutil.copy(proj / "moved.csv", proj / "labels.csv")
    moved = shutil.move(proj, tmp_path / "moved")          # a project moved with its files still resumes
    monkeypatch.chdir(moved)
    rc, out, err = cli("train", "--task", "csv", "--labels", "labels.csv", "--features", "features", "--out", "runs/r",
                       "--epochs", "1", "--lr", "1e-3", "--loss", "ce", "--bootstrap", "10", "-q", "--resume")
    assert rc == 0 and "seed 0: already finished, kept" in out, err


# ---- evaluate / heatmap / report -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "overwritten"])
def test_a_damaged_checkpoint_is_named_with_the_fix(trained, tmp_path, damage):
    run = _copy(trained, tmp_path / "run")
    best = run / "seed_0" / "best.pt"
    data = bytearray(best.read_bytes())
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:              # 2 KB inside the largest tensor's bytes: torch.load alone would not notice
        with zipfile.ZipFile(best) as z:
            big = max(z.infolist(), key=lambda i: i.file_size)
        off = big.header_offset
        start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(data[off + 28:off + 30], "little")
        mid = start + big.file_size // 2 - 1024
        data[mid:mid + 2048] = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    best.write_bytes(bytes(data))
    rc, _, err = cli("evaluate", run)
    assert rc == 2 and f"{best}: damaged checkpoint" in err and "--resume" in err, err
    assert damage != "overwritten" or "does not match its checksum" in err, err
    rc, _, err = cli("heatmap", run, "bag_0001")
    assert rc == 2 and f"{best}: damaged checkpoint" in err, err


def test_evaluate_refuses_splits_other_than_those_trained_on(cohort, trained, tmp_path):
    moved = tmp_path / "labels.csv"          # same slides and labels, one val slide moved into test
    rows = (cohort / "labels.csv").read_text().splitlines()
    i = next(k for k, r in enumerate(rows) if r.endswith(",val"))
    rows[i] = rows[i][:-len("val")] + "test"
    moved.write_text("\n".join(rows) + "\n")
    rc, _, err = cli("evaluate", trained, "--labels", moved)
    assert rc == 2 and "differ from those this run was trained on" in err, err
    rc, _, err = cli("evaluate", trained)
    assert rc == 0, err


def test_damaged_last_pt_and_features_of_another_dimension(cohort, trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    (run / "seed_0" / "metrics.json").unlink()       # an unfinished seed, so --resume reads last.pt
    last = run / "seed_0" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    rc, _, err = cli(*_train_args(cohort, run, "--resume"))
    assert rc == 2 and f"{last}: damaged checkpoint" in err, err
    other = make_cohort(tmp_path / "d5", n_slides=24, dim=5, bag_size=(10, 20))
    rc, _, err = cli("evaluate", trained, "--features", other / "features")
    assert rc == 2 and "best.pt: the weights do not fit" in err and "--features" in err, err
    rc, _, err = cli("heatmap", trained, "bag_0001", "--features", other / "features")
    assert rc == 2 and "best.pt: the weights do not fit" in err, err


def test_heatmap_refuses_another_slide_of_the_same_name(cohort, trained, tmp_path):
    rc, _, err = cli("heatmap", trained, cohort.parent / "other" / "bag_0000.tiff", "--out", tmp_path / "x.png")
    assert rc == 2 and "not the slide the features in" in err and "bag_0000.h5" in err, err
    assert not (tmp_path / "x.png").exists()
    rc, out, err = cli("heatmap", trained, cohort.parent / "slides" / "bag_0000.tiff", "--out", tmp_path / "ok.png")
    assert rc == 0 and (tmp_path / "ok.png").stat().st_size > 0, err


def test_report_checks_its_inputs_and_keeps_tasks_apart(trained, tmp_path):
    rc, _, err = cli("report", trained / "seed_0")
    assert rc == 2 and f"a seed folder; pass its run folder {trained}" in err, err
    rc, _, err = cli("report", trained, "--out", tmp_path)
    assert rc == 2 and "a folder; pass a file such as" in err, err
    bad = _copy(trained, tmp_path / "bad")
    (bad / "metrics.json").write_text('{"task": "csv", "mod')
    rc, _, err = cli("report", trained, bad)
    assert rc == 2 and f"{bad / 'metrics.json'}: unreadable" in err, err
    runs = [trained]
    for task in ("bracs", "camelyon17"):
        r = _copy(trained, tmp_path / task)
        agg = json.loads((r / "metrics.json").read_text())
        (r / "metrics.json").write_text(json.dumps(dict(agg, task=task)))
        runs.append(r)
    rc, out, err = cli("report", *runs, "--out", tmp_path / "report.md")
    assert rc == 0, err
    titles = [line for line in out.splitlines() if "test split" in line]
    assert [t.split(":")[0] for t in titles] == ["csv", "bracs", "camelyon17"]
    assert (tmp_path / "report.md").read_text().strip() == out.strip()


# ---- memory --------------------------------------------------------------------------------------
def test_padding_that_multiplies_memory_is_warned_about(tmp_path):
    c = make_cohort(tmp_path / "c", n_slides=20, dim=8, bag_size=(10, 20))
    w = FeatureWriter(c / "features" / "huge.h5", c / "features" / ".p", np.zeros((4000, 2)), 8, "float32")
    w.write(0, np.zeros((4000, 8), np.float32))
    w.commit()
    with open(c / "labels.csv", "a") as fh:
        fh.write("huge,0,train\n")
    cfg = TrainConfig(task="csv", labels=str(c / "labels.csv"), features=str(c / "features"), batch_size=4)
    task, store, _ = prepare(cfg)
    note = padding_warning(cfg, task, store)
    assert note and "huge trains on 4,000 patches" in note and "--batch-size 1" in note and "--max-patches" in note
    assert "huge trains on 1,000 patches" in padding_warning(TrainConfig(**dict(cfg.to_dict(), patch_dropout=0.75)),
                                                           task, store)
    assert padding_warning(TrainConfig(**dict(cfg.to_dict(), batch_size=1)), task, store) is None
    assert padding_warning(TrainConfig(**dict(cfg.to_dict(), max_patches=20)), task, store) is None


def test_packing_the_features_keeps_the_run_resumable(cohort, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cohort, c, ignore=shutil.ignore_patterns("run", "slides", "other"))
    rc, _, err = cli(*_train_args(c, tmp_path / "run", "--epochs", "1"))
    assert rc == 0, err
    pack_features(str(c / "features"))                  # the same features, now read from cohort.zarr
    assert FeatureSource(c / "features").kind == "zarr"
    rc, out, err = cli(*_train_args(c, tmp_path / "run", "--epochs", "2", "--resume"))
    assert rc == 0 and "resuming with epochs 1 -> 2" in out, err
