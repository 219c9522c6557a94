"""``predict`` and heatmaps on real files: generated pyramidal TIFF slides, real extraction with an
offline encoder, a real (tiny) trained run, OpenSlide's damaged fixture."""

import csv
import json
import shutil

import numpy as np
import pytest

from wsi_ncmi.extract import ExtractConfig, run_extraction
from wsi_ncmi.predict.runner import run_predict
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.run import run_evaluation, run_training
from wsi_ncmi.viz.heatmap import paint

from conftest import make_tissue_slide, run_cli

EXTRACT = dict(encoder="efficientnet_lite0", mpp=2.0, patch_size=224, min_tissue=0.5, workers=0, progress=False)
CLASSES = ["a", "b"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 slides, extracted, an NCMI run of 2 seeds, evaluated. The two classes look alike (tissue of one
    kind, labels alternating), so the class probabilities are far from 0 and 1 and their digits count."""
    root = tmp_path_factory.mktemp("predict")
    rows = ["slide_id,label,split"]
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    for i in range(8):
        lab = CLASSES[i % 2]
        make_tissue_slide(root / "slides" / f"s{i}.tiff", 1.0, [(150, 150, 1500 + 40 * i, 1100)], width_um=2000,
                          height_um=1500, seed=i)
        rows.append(f"s{i},{lab},{splits[i]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ex = run_extraction(ExtractConfig(slides=[str(root / "slides")], out=str(root / "features"), **EXTRACT))
    assert not ex.failed, ex.render()
    run = root / "run"
    run_training(TrainConfig(task="csv", labels=str(root / "labels.csv"), features=str(root / "features"),
                             out=str(run), model="abmil", loss="ncmi", seeds=2, epochs=2, lr=1e-3, progress=False,
                             bootstrap=10, device="cpu"))
    run_evaluation(run)
    return root


def _evaluated(run):
    """slide -> seed -> class probabilities, from evaluate's predictions of every split."""
    got = {}
    for seed in (0, 1):
        for sp in ("train", "val", "test"):
            with open(run / "evaluate" / f"seed_{seed}" / f"predictions_{sp}.csv") as fh:
                for r in csv.DictReader(fh):
                    got.setdefault(r["slide_id"], {})[seed] = [float(r[f"p_{k}"]) for k in range(2)]
    return got


def _rows(path):
    with open(path) as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def test_predict_on_slides_reproduces_evaluate(trained, tmp_path):
    out = tmp_path / "pred"
    res = run_predict(trained / "run", [str(trained / "slides")], out, progress=False)
    assert not res.failures and res.members == ["seed_0", "seed_1"]
    rows = _rows(out / "predictions.csv")
    ev = _evaluated(trained / "run")
    assert set(rows) == set(ev) == {f"s{i}" for i in range(8)}
    for sid, r in rows.items():
        for seed in (0, 1):
            mine = [float(r[f"seed_{seed}/p_{c}"]) for c in CLASSES]
            assert np.allclose(mine, ev[sid][seed], atol=1e-5, rtol=0), (sid, seed, mine, ev[sid][seed])
        mean = np.mean([ev[sid][s] for s in (0, 1)], 0)
        assert np.allclose([float(r[f"p_{c}"]) for c in CLASSES], mean, atol=1e-5)
        assert r["pred"] == CLASSES[int(np.argmax(mean))] and 0 <= float(r["attention_entropy"]) <= 1
    assert len(list((out / "features").glob("*.h5"))) == 8           # extracted with the run's settings
    prov = json.loads((trained / "run" / "features.json").read_text())["provenance"]
    assert prov["settings"]["encoder"] == "efficientnet_lite0" and prov["weights_id"].startswith("file:")


def test_predict_on_a_features_folder_without_labels(trained, tmp_path):
    rc = run_cli("predict", str(trained / "run"), str(trained / "features"), "--out", str(tmp_path / "p"), "-q")
    assert rc.returncode == 0, rc.stderr
    assert "8 slides scored by 2 member(s)" in rc.stdout
    rows = _rows(tmp_path / "p" / "predictions.csv")
    ev = _evaluated(trained / "run")
    assert all(np.allclose([float(rows[s][f"seed_0/p_{c}"]) for c in CLASSES], ev[s][0], atol=1e-5, rtol=0) for s in rows)
    assert not (tmp_path / "p" / "features").exists()                 # nothing extracted


def test_moved_and_damaged_slides_are_named_and_skipped(trained, tmp_path, openslide_fixtures):
    bad = tmp_path / "in" / "unreadable.svs"
    bad.parent.mkdir()
    shutil.copy(openslide_fixtures / "unreadable.svs", bad)
    moved = tmp_path / "gone" / "s9.tiff"
    rc = run_cli("predict", str(trained / "run"), str(trained / "slides" / "s6.tiff"), str(moved), str(bad),
                 "--out", str(tmp_path / "p"), "-q")
    assert rc.returncode == 1, rc.stderr
    assert f"FAILED [missing] {moved}: no such file or folder" in rc.stdout, rc.stdout
    assert f"FAILED [unreadable] {bad}: read error" in rc.stdout and "copy or scan it again" in rc.stdout, rc.stdout
    assert sum(line.startswith("  FAILED") for line in rc.stdout.splitlines()) == 2, rc.stdout
    assert list(_rows(tmp_path / "p" / "predictions.csv")) == ["s6"]
    failures = json.loads((tmp_path / "p" / "predict.json").read_text())["failures"]
    assert {f["slide_id"] for f in failures} == {"s9", "unreadable"}


def test_features_of_other_settings_are_refused(trained, tmp_path):
    other = tmp_path / "other"
    ex = run_extraction(ExtractConfig(slides=[str(trained / "slides" / "s6.tiff")], out=str(other / "features"),
                                      **dict(EXTRACT, min_tissue=0.9)))
    assert not ex.failed
    rc = run_cli("predict", str(trained / "run"), str(other / "features"), "--out", str(tmp_path / "p"), "-q")
    assert rc.returncode == 2 and "extracted with other settings than the run's features" in rc.stderr, rc.stderr
    assert "min_tissue=0.9 (run: 0.5)" in rc.stderr, rc.stderr
    # the slide itself into an --out whose features/ holds the other extraction: refused by extraction
    rc = run_cli("predict", str(trained / "run"), str(trained / "slides" / "s6.tiff"), str(trained / "slides" / "s7.tiff"),
                 "--out", str(other), "-q")
    assert rc.returncode == 1 and "FAILED [settings-mismatch]" in rc.stdout and "min_tissue" in rc.stdout, rc.stdout
    assert list(_rows(other / "predictions.csv")) == ["s7"]


def _geojson_ok(path, n):
    gj = json.loads(path.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == n
    for f in gj["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert f["properties"]["objectType"] == "detection"
        m = f["properties"]["measurements"]
        assert set(m) == {"attention", "information"} and all(np.isfinite(v) for v in m.values())
    return gj


def test_heatmaps_geojson_and_overlap(trained, tmp_path):
    import h5py

    n = len(h5py.File(trained / "features" / "s6.h5", "r")["coords"])
    rc = run_cli("predict", str(trained / "run"), str(trained / "features" / "s6.h5"), "--out", str(tmp_path / "p"),
                 "--heatmaps", "-q")
    assert rc.returncode == 0, rc.stderr
    assert "heatmap s6: " in rc.stdout and " s -> " in rc.stdout
    assert (tmp_path / "p" / "heatmaps" / "s6.png").stat().st_size > 5000
    plain = _geojson_ok(tmp_path / "p" / "heatmaps" / "s6.geojson", n)
    ext = 224 * 2.0 / 1.0
    x, y = plain["features"][0]["geometry"]["coordinates"][0][0]
    assert plain["features"][0]["geometry"]["coordinates"][0][2] == [x + ext, y + ext]      # level-0 px
    rc = run_cli("heatmap", str(trained / "run"), str(trained / "slides" / "s6.tiff"), "--kind", "info",
                 "--overlap", "0.5", "--out", str(tmp_path / "o.png"))
    assert rc.returncode == 0, rc.stderr
    assert " s -> " in rc.stdout
    fine = json.loads((tmp_path / "o.geojson").read_text())
    assert len(fine["features"]) > 2 * n
    _geojson_ok(tmp_path / "o.geojson", len(fine["features"]))
    assert (tmp_path / "o.png").stat().st_size > 5000
    rc = run_cli("heatmap", str(trained / "run"), "s6", "--overlap", "0.6")
    assert rc.returncode == 2 and "--overlap 0.6" in rc.stderr


def test_paint_averages_overlapping_patches():
    heat = paint((4, 6), np.array([[0, 0], [2, 0]]), (4.0, 4.0), (1.0, 1.0), np.array([1.0, 3.0]))
    assert heat[0, 0] == 1.0 and heat[0, 2] == 2.0 and heat[0, 5] == 3.0 and heat.mask.sum() == 0
    empty = paint((4, 6), np.array([[0, 0]]), (2.0, 2.0), (1.0, 1.0), np.array([5.0]))
    assert empty.mask[3, 5] and empty[1, 1] == 5.0


def test_camelyon17_patients_with_five_nodes_get_a_pn_stage():
    from wsi_ncmi.predict.runner import _pn_stages

    preds = ["negative", "itc", "macro", "micro", "negative"]
    rows = [{"slide_id": f"patient_020_node_{k}", "pred": p} for k, p in enumerate(preds)]
    rows += [{"slide_id": f"patient_021_node_{k}", "pred": "macro"} for k in range(4)] + [{"slide_id": "x", "pred": "itc"}]
    _pn_stages(rows, ["negative", "itc", "micro", "macro"])
    assert {r["pn_stage"] for r in rows[:5]} == {"pN1"} and rows[0]["patient"] == "patient_020"
    assert all(r["pn_stage"] == "" for r in rows[5:]) and rows[-1]["patient"] == ""


def test_fold_members_are_scored_too(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "fold_1").mkdir()
    shutil.move(run / "seed_1", run / "fold_1" / "seed_1")        # a cross-validated run's layout
    shutil.copy(run / "metrics.json", run / "fold_1" / "metrics.json")
    res = run_predict(run, [str(trained / "features" / "s6.h5")], tmp_path / "p", progress=False)
    assert res.members == ["seed_0", "fold_1/seed_1"]
    r = _rows(tmp_path / "p" / "predictions.csv")["s6"]
    ev = _evaluated(trained / "run")["s6"]
    assert np.allclose([float(r[f"fold_1/seed_1/p_{c}"]) for c in CLASSES], ev[1], atol=1e-6)


def test_shifted_grids_without_a_tissue_mask_keep_patches_half_on_stored_ones():
    from wsi_ncmi.predict.shifted import shifted_grids, shifts_per_axis

    g = shifted_grids(np.array([[0, 0], [100, 0]]), (0, 0, 400, 400), (100.0, 100.0), 2)
    assert g[(1, 0)].tolist() == [[50, 0], [150, 0]]
    assert g[(0, 1)].tolist() == [[0, 50], [100, 50]]
    assert g[(1, 1)].tolist() == [[50, 50]]
    assert [shifts_per_axis(o) for o in (0, 0.5, 0.75, 0.8)] == [1, 2, 4, 5]
