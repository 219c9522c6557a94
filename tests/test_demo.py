"""The demo: slide geometry gives the labels; a reduced demo runs end to end and resumes."""

import csv
import json

import numpy as np
import openslide
import pytest
from sklearn.metrics import average_precision_score

from wsi_ncmi.demo.cohort import CLASSES, build_cohort, label_from_diameters
from wsi_ncmi.demo.lesions import patches_touching
from wsi_ncmi.slides.open import rgba_to_rgb
from wsi_ncmi.store.h5 import read_feature_file

from conftest import run_cli


def test_label_rule():
    assert [label_from_diameters(d) for d in ([], [150.0], [150.0, 250.0], [1999.0], [2100.0, 100.0])] == [0, 1, 2, 2, 3]


def measured_diameter(path: str, lesion: dict) -> float:
    """Diameter of the tumour-coloured disc around a lesion's centre, from the slide's own pixels.

    Radial profile of the fraction of tumour-coloured pixels (G/B < 0.62: the implant is
    hyperchromatic); the edge is the outermost radius where the profile is still above half-way
    between the disc's inside and the surrounding tissue.
    """
    s = openslide.OpenSlide(path)
    mpp0 = float(s.properties["openslide.mpp-x"])
    r_um = lesion["diameter_um"] / 2
    level = max(i for i, d in enumerate(s.level_downsamples) if d * mpp0 <= max(mpp0, r_um / 40))
    mpp = mpp0 * s.level_downsamples[level]
    R = 1.6 * r_um + 60
    size = int(2 * R / mpp)
    img = rgba_to_rgb(s.read_region((int((lesion["x_um"] - R) / mpp0), int((lesion["y_um"] - R) / mpp0)), level,
                                    (size, size))).astype(np.float32)
    s.close()
    tum = (img[..., 1] / np.maximum(img[..., 2], 1) < 0.62).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    rr = np.hypot(xx + 0.5 - R / mpp, yy + 0.5 - R / mpp) * mpp
    step = max(mpp, r_um / 30)
    edges = np.arange(0, R - step, step)
    prof = np.array([tum[(rr >= a) & (rr < a + step)].mean() for a in edges])
    inside, outside = prof[: max(1, len(prof) // 4)].mean(), prof[-5:].mean()
    above = np.nonzero(prof >= (inside + outside) / 2)[0]
    return 2 * (edges[above[-1]] + step)


def test_demo_labels_follow_the_lesion_sizes_in_the_slides(tmp_path):
    out = build_cohort(tmp_path, patients_per_centre=1, nodes=4, centres=1, progress=False)
    plan = json.loads((out / "lesions.json").read_text())
    assert sorted(s["label"] for s in plan) == [0, 1, 2, 3]
    stage = (out / "stage_labels.csv").read_text()
    for s in plan:
        assert f"{s['slide_id']}.tif,{CLASSES[s['label']]}" in stage
        measured = [measured_diameter(s["path"], les) for les in s["lesions"]]
        for les, m in zip(s["lesions"], measured):
            assert abs(m - les["diameter_um"]) <= 0.1 * les["diameter_um"] + 10, (s["slide_id"], les, m)
        assert label_from_diameters(measured) == s["label"]   # the label follows from the pixels
        sl = openslide.OpenSlide(s["path"])
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(1.0) and sl.level_count >= 3


def test_patches_touching_a_lesion_match_the_pixels():
    """The lesion AP's positives: a patch touches a lesion when any of its points lies in a disc,
    checked against a dense sampling of every patch square (slide at 0.5 um/px)."""
    rng = np.random.default_rng(3)
    mpp0, ext = 0.5, 224.0
    xs = np.arange(0, 4000, ext)
    coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2).astype(int)
    lesions = [{"x_um": float(rng.uniform(0, 2000)), "y_um": float(rng.uniform(0, 2000)),
                "diameter_um": float(d)} for d in (90, 150, 600, 1300)]
    got = patches_touching(coords, (ext, ext), lesions, mpp0)
    t = np.linspace(0, 1, 129)
    want = np.zeros(len(coords), bool)
    for i, (x, y) in enumerate(coords):
        px, py = np.meshgrid(x + t * ext, y + t * ext)            # level-0 px of the patch square
        for les in lesions:
            r = les["diameter_um"] / 2 / mpp0
            want[i] |= bool((np.hypot(px - les["x_um"] / mpp0, py - les["y_um"] / mpp0) <= r).any())
    assert got.sum() > 10 and np.array_equal(got, want)


def test_demo_cohort_design():
    """The default cohort: about 30 training slides per class in centres 0-2 (after validation
    takes a fifth), ten test slides per class, ITC nodes with 4-6 clusters, and patients that span
    four pN stages."""
    from wsi_ncmi.demo.cohort import ITC_FOCI, plan_cohort
    from wsi_ncmi.demo.run import DEMO_COHORT
    from wsi_ncmi.tasks.camelyon17 import pn_stage

    c = DEMO_COHORT
    plan = plan_cohort(c["patients_per_centre"], 5, c["width_um"], c["height_um"])
    for lab in range(4):
        assert sum(s.label == lab and s.centre < 3 for s in plan) * 0.8 >= 29
        assert sum(s.label == lab and s.centre >= 3 for s in plan) == 10
    itc = [s for s in plan if s.label == 1]
    assert {len(s.lesions) for s in itc} == set(range(ITC_FOCI[0], ITC_FOCI[1] + 1))
    assert all(label_from_diameters([l["diameter_um"] for l in s.lesions]) == s.label for s in plan)
    stages = {pn_stage([s.label for s in plan if s.patient == p]) for p in {s.patient for s in plan if s.centre >= 3}}
    assert len(stages) == 4


def test_demo_refuses_a_folder_of_another_plan(tmp_path):
    from wsi_ncmi.errors import WsiNcmiError

    """Slides of another plan are never reused under new labels: a finished or interrupted build of
    other settings, and slides without a cohort record (an older wsi-ncmi), are refused; the same
    plan resumes."""
    kw = dict(patients_per_centre=1, nodes=2, centres=1, progress=False, height_um=1500)
    build_cohort(tmp_path / "a", width_um=1500, **kw)
    with pytest.raises(WsiNcmiError, match="another plan"):
        build_cohort(tmp_path / "a", width_um=1600, **kw)
    (tmp_path / "a" / "slides" / "patient_000_node_1.tif").unlink()          # interrupted: one slide missing
    (tmp_path / "a" / "lesions.json").unlink()
    with pytest.raises(WsiNcmiError, match="another plan"):
        build_cohort(tmp_path / "a", width_um=1600, **kw)
    build_cohort(tmp_path / "a", width_um=1500, **kw)                        # the same plan resumes
    assert (tmp_path / "a" / "slides" / "patient_000_node_1.tif").is_file()
    (tmp_path / "a" / "cohort.json").unlink()                                 # an older wsi-ncmi's folder
    with pytest.raises(WsiNcmiError, match="another plan"):
        build_cohort(tmp_path / "a", width_um=1500, **kw)


@pytest.mark.slow
def test_reduced_demo_end_to_end_and_rerun(tmp_path, capsys):
    from wsi_ncmi.demo.run import run_demo

    kw = dict(patients_per_centre=1, nodes=2, seeds=2, epochs=4, width_um=3000, height_um=2400, bootstrap=50)
    out = run_demo(tmp_path, **kw)
    res = out["runs"]
    first = capsys.readouterr().out
    assert set(res) == {"ncmi", "ce"} and "| ncmi |" in first and "| ce |" in first
    for stage in ("[1/5]", "[5/5]", "lesion AP", "NCMI - CE, paired", "ncmi prediction rule per seed", "total ",
                  "train ce "):
        assert stage in first, stage
    d = out["ncmi_minus_ce"]["macro_f1"]
    assert np.isfinite(d).all() and d[1] <= d[2]
    plan = {s["slide_id"]: s for s in json.loads((tmp_path / "lesions.json").read_text())}
    checked = 0
    for loss in ("ncmi", "ce"):
        ap = out["lesion_ap"][loss]
        assert ap.slides >= 1 and 0 < ap.chance < 1 and 0 <= ap.ap <= 1
        for png in (tmp_path / "runs" / f"{loss}_patch_dropout_0.5" / "heatmaps").glob("*.png"):   # from the heatmap's CSV
            sid = png.stem
            if sid not in ap.per_slide:
                continue
            rows = list(csv.DictReader(open(png.with_suffix(".csv"))))
            ff = read_feature_file(tmp_path / "features" / f"{sid}.h5")
            assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(map(int, c)) for c in ff.coords]
            touch = patches_touching(ff.coords, (ff.attrs["patch_size_level0_x"], ff.attrs["patch_size_level0_y"]),
                                     plan[sid]["lesions"], 1.0)
            att = np.array([float(r["attention"]) for r in rows])
            assert average_precision_score(touch, att) == pytest.approx(ap.per_slide[sid][0], abs=1e-4)
            checked += 1
    assert checked >= 1
    report = (tmp_path / "report.md").read_text()
    val_rows = report.split("## Validation split")[1].split("## Confusion")[0]
    assert "| ncmi | " in val_rows and "| ce | " in val_rows
    for part in ("## Validation split", "## Confusion matrices (test)", "| true \\ predicted |", "## Lesion AP per test slide",
                 "NCMI vs accuracy", "## Heatmaps: one test slide per class"):
        assert part in report, part
    for loss in ("ncmi", "ce"):       # the demo's default: both losses with --patch-dropout 0.5
        run = tmp_path / "runs" / f"{loss}_patch_dropout_0.5"
        assert "patch_dropout: 0.5" in (run / "config.yaml").read_text()
        m = json.loads((run / "metrics.json").read_text())
        assert 0 <= m["test"]["macro_f1"]["mean"] <= 1 and m["task"] == "camelyon17"
        assert (run / "seed_0" / "curves.png").stat().st_size > 5000
        pngs = sorted((run / "heatmaps").glob("*.png"))
        assert len(pngs) >= 1
        rows = list(csv.DictReader(open(pngs[0].with_suffix(".csv"))))   # per-patch attention and information
        assert len(rows) > 10 and len(rows[0]) == 4 and all(np.isfinite(float(r[k])) for r in rows for k in r)
    assert len(list((tmp_path / "features").glob("*.h5"))) == 10
    # the in-context estimator on a real slide, with blocks of neighbouring patches removed together
    slide = next(p for p in sorted((tmp_path / "slides").rglob("*.tif*")))
    png = tmp_path / "removal.png"
    r = run_cli("heatmap", str(tmp_path / "runs" / "ce_patch_dropout_0.5"), str(slide), "--kind", "info", "--estimator", "removal",
                "--max-evals", "8", "--target-class", "macro", "--out", str(png))
    assert r.returncode == 0, r.stderr
    vals = [float(row["info_macro"]) for row in csv.DictReader(open(png.with_suffix(".csv")))]
    assert png.stat().st_size > 5000 and 1 < len(set(vals)) <= 8          # one value per removed block
    bad = run_cli("heatmap", str(tmp_path / "runs" / "ce_patch_dropout_0.5"), str(slide), "--kind", "info", "--target-class", "nope")
    assert bad.returncode != 0 and "not a class of this run" in bad.stderr and "Traceback" not in bad.stderr
    report = (tmp_path / "report.md").read_text()
    for link in [l.split("](")[1].rstrip(")") for l in report.splitlines() if l.startswith("![")]:
        assert (tmp_path / link).is_file(), link
    run_demo(tmp_path, **kw)
    second = capsys.readouterr().out
    assert "all 10 slides are already extracted" in second
    again = json.loads((tmp_path / "runs" / "ncmi_patch_dropout_0.5" / "metrics.json").read_text())
    assert again["test"] == json.loads(json.dumps(res["ncmi"]["test"]))
    with pytest.raises(Exception, match="another plan"):
        run_demo(tmp_path, **dict(kw, width_um=3100))
    # --patch-dropout 0 (the library defaults) trains beside the default runs, on the same features,
    # and leaves them as they were
    lib = run_demo(tmp_path, **dict(kw, patch_dropout=0.0))
    for loss in ("ncmi", "ce"):
        assert "patch_dropout: 0.0" in (tmp_path / "runs" / loss / "config.yaml").read_text()
        assert lib["lesion_ap"][loss].slides == out["lesion_ap"][loss].slides
    lib_report = (tmp_path / "report_patch_dropout_0.md").read_text()
    assert "runs/ce/seed_0/curves.png" in lib_report and "--patch-dropout 0, mean" in lib_report
    for link in [l.split("](")[1].rstrip(")") for l in lib_report.splitlines() if l.startswith("![")]:
        assert (tmp_path / link).is_file(), link
    assert json.loads((tmp_path / "runs" / "ncmi_patch_dropout_0.5" / "metrics.json").read_text())["test"] == again["test"]
    report = (tmp_path / "report.md").read_text()
    assert "runs/ce_patch_dropout_0.5/seed_0" in report and "--patch-dropout 0.5, mean" in report
    # runs trained by an older wsi-ncmi with other defaults (features as extracted) are trained again
    # with a note, not refused as a --resume with changed settings
    ce = tmp_path / "runs" / "ce"
    for name in ("config.yaml", "run.json"):
        text = (ce / name).read_text()
        old = text.replace("feature_norm: zscore", "feature_norm: none").replace('"feature_norm": "zscore"',
                                                                                '"feature_norm": "none"')
        assert old != text, name
        (ce / name).write_text(old)
    capsys.readouterr()
    run_demo(tmp_path, **dict(kw, patch_dropout=0.0))
    third = capsys.readouterr().out
    assert f"{ce} was trained by an older wsi-ncmi with other settings (feature_norm (none -> zscore))" in third
    assert "feature_norm: zscore" in (ce / "config.yaml").read_text()
    assert "ncmi was trained by an older" not in third


def test_demo_cli_refuses_bad_counts_before_writing(tmp_path):
    for bad in ("1,2", "x", "0", "21"):
        r = run_cli("demo", "--out", str(tmp_path / "d"), "--patients-per-centre", bad)
        assert r.returncode == 2 and "--patients-per-centre" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    r = run_cli("demo", "--out", str(tmp_path / "d"), "--patch-dropout", "1")
    assert r.returncode == 2 and "--patch-dropout 1.0" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from wsi_ncmi.demo.run import DEMO_PATCH_DROPOUT

    assert f"(default {DEMO_PATCH_DROPOUT:g}:" in " ".join(run_cli("demo", "--help").stdout.split())


def test_demo_cli_leaves_patch_dropout_to_the_demo_unless_given(tmp_path, monkeypatch):
    """Without --patch-dropout the demo's own default (DEMO_PATCH_DROPOUT) applies, the value the
    help text names; a given value is passed through."""
    import wsi_ncmi.demo.run as demo
    from wsi_ncmi.cli import main

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: calls.append(kw))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "--patch-dropout", "0"]) == 0
    assert "patch_dropout" not in calls[0] and calls[1]["patch_dropout"] == 0.0
    assert not (tmp_path / "d").exists()
