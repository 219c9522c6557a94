"""Tissue masks from GeoJSON (our export, edited as in QuPath) and marker-ink removal, on real H&E.

The slide is the real CMU-1 crop read through OpenSlide; edited masks and inked copies are real
files (GeoJSON written to disk, pyramidal JPEG TIFFs written with ``tiff_writer``) run through
the real ``wsi-ncmi extract``.
"""

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest

from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.extract.plan import plan_slide
from wsi_ncmi.slides.geojson import GeoJSONError, mask_to_geojson, rasterize_polygons, read_tissue_geojson
from wsi_ncmi.slides.tiff_writer import write_pyramidal_tiff
from wsi_ncmi.store import read_feature_file

from conftest import run_cli

FAST = ["--encoder", "efficientnet_lite0", "--patch-size", "224", "--workers", "1", "--quiet",
        "--feature-dtype", "float32"]
EXTENT = 224 * 0.5 / 0.499          # level-0 px of one patch on the CMU crop (0.499 um/px)


def _status(out: Path) -> dict:
    logs = sorted((out / "logs").glob("extract-*.json"), key=lambda p: p.stat().st_mtime)
    return {r["slide_id"]: (r["status"], r["reason"], r["message"])
            for r in json.loads(logs[-1].read_text())["results"]}


def _coords(h5: Path) -> dict:
    ff = read_feature_file(h5)
    return {tuple(c): f for c, f in zip(ff.coords.tolist(), ff.features)}


# ---- the GeoJSON reader and the export/import round trip --------------------------------------
def _write(tmp_path: Path, obj, name="s.geojson") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_every_qupath_shape_reads_and_holes_are_honoured(tmp_path):
    outer = [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]
    hole = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]
    other = [[500, 0], [600, 0], [600, 100], [500, 0]]
    poly = {"type": "Polygon", "coordinates": [outer, hole]}
    multi = {"type": "MultiPolygon", "coordinates": [[outer, hole], [other]]}
    feature = {"type": "Feature", "geometry": multi, "properties": {"classification": {"name": "Tissue"}}}
    shapes = {
        "collection": {"type": "FeatureCollection", "features": [feature, {"type": "Feature", "geometry": None}]},
        "feature": feature,
        "list": [poly, {"type": "Polygon", "coordinates": [other]}, {"type": "Point", "coordinates": [5, 5]}],
    }
    masks = []
    for name, obj in shapes.items():
        polys, digest = read_tissue_geojson(_write(tmp_path, obj, f"{name}.geojson"))
        assert digest == hashlib.sha256((tmp_path / f"{name}.geojson").read_bytes()).hexdigest()
        masks.append(rasterize_polygons(polys, (50, 80), 10.0, 10.0))
    for m in masks[1:]:
        assert np.array_equal(m, masks[0])
    m = masks[0]
    assert m[5, 5] and not m[20, 20] and m[5, 55]     # tissue, inside the hole, the second polygon
    assert not m[:, 65:].any()                        # nothing beyond the polygons


@pytest.mark.parametrize("text, says", [
    ("{not json", "not valid JSON"),
    ({"type": "FeatureCollection"}, "\"features\" list"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "fewer than 3 distinct points"),
    ({"type": "Polygon", "coordinates": [[["a", 0], [1, 1], [2, 0]]]}, "[x, y] numbers"),
    ({"type": "Circle", "coordinates": [0, 0]}, "unknown GeoJSON type 'Circle'"),
    ([{"type": "LineString", "coordinates": [[0, 0], [5, 5]]}], "no Polygon or MultiPolygon"),
])
def test_malformed_geojson_is_one_line_naming_file_and_fix(tmp_path, text, says):
    p = _write(tmp_path, text)
    with pytest.raises(GeoJSONError) as err:
        read_tissue_geojson(p)
    msg = str(err.value)
    assert says in msg and str(p) in msg and "QuPath" in msg and "\n" not in msg


def test_every_export_is_readable_even_of_speckled_masks(tmp_path):
    rng = np.random.default_rng(1)
    for _ in range(100):
        p = _write(tmp_path, mask_to_geojson(rng.random((30, 40)) > 0.6, 7.0, 7.0, "x"))
        read_tissue_geojson(p)     # lone pixels and one-pixel lines are left out, never written broken


def test_polygons_outside_the_slide_are_an_error_naming_the_size(tmp_path):
    from wsi_ncmi.slides.tissue import _mask_from_geojson

    far = {"type": "Polygon", "coordinates": [[[9000, 9000], [9500, 9000], [9500, 9500], [9000, 9000]]]}
    with pytest.raises(GeoJSONError, match=r"lie outside the slide \(800 x 500 level-0 px\)"):
        _mask_from_geojson(_write(tmp_path, far), (50, 80), 10.0, 10.0, (800, 500))


def test_random_masks_with_holes_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = cv2.GaussianBlur(rng.random((90, 120)), (0, 0), 5) > 0.5
        m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
        p = _write(tmp_path, mask_to_geojson(m, 13.7, 9.3, "x"))
        polys, _ = read_tissue_geojson(p)
        assert np.array_equal(rasterize_polygons(polys, m.shape, 13.7, 9.3), m)


# ---- acceptance: export the CMU tissue, edit it, re-import through extract ----------------------
@pytest.fixture(scope="module")
def cmu_exported(tmp_path_factory, cmu_svs):
    d = tmp_path_factory.mktemp("cmu")
    slides = d / "slides"
    slides.mkdir()
    shutil.copy(cmu_svs, slides / "cmu.svs")
    out = d / "detected"
    res = run_cli("extract", str(slides), "--out", str(out), *FAST)
    assert res.returncode == 0, res.stdout + res.stderr
    return d, out


def test_edited_geojson_reimports_through_extract(cmu_exported):
    d, detected = cmu_exported
    exported = json.loads((detected / "tissue" / "cmu.geojson").read_text())
    before = _coords(detected / "cmu.h5")
    with h5py.File(detected / "cmu.h5") as f:
        frac = dict(zip(map(tuple, f["coords"][()].tolist()), f["tissue_fraction"][()].astype(float)))
    # the edit: cut a hole (as one would in QuPath) over a 2 x 2 block of all-tissue patches
    block = next([(x, y), (x2, y), (x, y2), (x2, y2)] for (x, y) in sorted(before)
                 for x2 in [round(x + EXTENT)] for y2 in [round(y + EXTENT)]
                 if all(frac.get(c, 0) == 1.0 for c in [(x, y), (x2, y), (x, y2), (x2, y2)]))
    x0, y0 = block[0]
    x1, y1 = x0 + 2 * EXTENT, y0 + 2 * EXTENT
    edited = json.loads(json.dumps(exported))
    feat = edited["features"][0]
    feat["geometry"]["coordinates"].append([[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]])
    # the cohort: the unedited export, the edited one (as a single Feature), a broken one, none
    slides, masks = d / "slides2", d / "masks"
    slides.mkdir()
    masks.mkdir()
    for sid in ("same", "edited", "broken", "nofile"):
        shutil.copy(d / "slides" / "cmu.svs", slides / f"{sid}.svs")
    (masks / "same.geojson").write_text(json.dumps(exported))
    (masks / "edited.geojson").write_text(json.dumps(feat))
    (masks / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    out = d / "from_geojson"
    res = run_cli("extract", str(slides), "--out", str(out), "--tissue-geojson", str(masks), *FAST)
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
    st = _status(out)
    assert st["same"][:2] == st["edited"][:2] == st["nofile"][:2] == ("done", "")
    assert st["broken"][:2] == ("failed", "bad-geojson")
    line = next(l for l in res.stdout.splitlines() if "broken.geojson" in l)
    assert "not valid JSON" in line and "QuPath" in line
    # `info` dry-runs the same masks: the patch counts extraction got, the broken file named
    res = run_cli("info", *(str(slides / f"{sid}.svs") for sid in ("same", "edited", "broken", "nofile")),
                  "--tissue-geojson", str(masks), "--patch-size", "224", "--json")
    info = {i["slide_id"]: i for i in json.loads(res.stdout)}
    assert res.returncode == 1 and info["broken"]["reason"] == "bad-geojson" and "broken.geojson" in info["broken"]["error"]
    assert [info[s]["patches"] for s in ("same", "edited", "nofile")] == [len(before), len(before) - 4, len(before)]
    assert info["edited"]["tissue_source"].startswith("geojson:") and info["nofile"]["tissue_source"] == "detection"
    res = run_cli("info", str(slides / "same.svs"), "--tissue-geojson", str(d / "nowhere"))
    assert res.returncode == 2 and "--tissue-geojson" in res.stderr and "no such folder" in res.stderr
    # unedited export == detection, patch for patch; no file == detection
    for sid in ("same", "nofile"):
        got = _coords(out / f"{sid}.h5")
        assert got.keys() == before.keys()
    # the edit removes exactly the 4 patches in the hole; every other patch is unchanged
    got = _coords(out / "edited.h5")
    assert set(got) == set(before) - set(block)
    for c, f in got.items():
        np.testing.assert_allclose(f, before[c], rtol=1e-4, atol=1e-4)
    # provenance: which mask made each file
    attrs = {sid: read_feature_file(out / f"{sid}.h5", features=False).attrs for sid in ("edited", "nofile")}
    sha = hashlib.sha256((masks / "edited.geojson").read_bytes()).hexdigest()
    assert attrs["edited"]["tissue_source"] == f"geojson:{sha}"
    assert attrs["edited"]["tissue_geojson"] == str((masks / "edited.geojson").resolve())
    assert attrs["nofile"]["tissue_source"] == "detection"
    assert attrs["edited"]["settings_fingerprint"]["tissue_source"] == f"geojson:{sha}"   # decoded JSON
    # editing the mask again makes the old file stale: refused with the reason, others skipped
    feat["geometry"]["coordinates"].pop()
    (masks / "edited.geojson").write_text(json.dumps(feat))
    (masks / "broken.geojson").unlink()
    res = run_cli("extract", str(slides), "--out", str(out), "--tissue-geojson", str(masks), *FAST)
    st = _status(out)
    assert st["edited"][1] == "settings-mismatch" and "tissue_source='geojson:" in st["edited"][2]
    assert st["same"][0] == st["nofile"][0] == "skipped" and st["broken"][0] == "done"


def test_files_from_before_tissue_source_still_match(cmu_exported):
    """Feature files written before the tissue_source/remove_pen keys existed are not refused."""
    d, detected = cmu_exported
    out = d / "old"
    shutil.copytree(detected, out)
    with h5py.File(out / "cmu.h5", "r+") as f:
        fp = json.loads(f.attrs["settings_fingerprint"])
        del fp["tissue_source"], fp["remove_pen"]
        f.attrs["settings_fingerprint"] = json.dumps(fp)
    res = run_cli("extract", str(d / "slides"), "--out", str(out), *FAST)
    assert res.returncode == 0 and _status(out)["cmu"][0] == "skipped", res.stdout


def test_exports_edited_in_place_are_used_and_never_overwritten(cmu_exported):
    """The QuPath round trip in one folder: ``--tissue-geojson <out>/tissue`` with the same --out."""
    d, detected = cmu_exported
    out = d / "inplace"
    shutil.copytree(detected, out)
    gj = out / "tissue" / "cmu.geojson"
    args = ("extract", str(d / "slides"), "--out", str(out), "--tissue-geojson", str(out / "tissue"), *FAST)
    res = run_cli(*args)       # the unedited export is the file's own mask: nothing to redo
    assert res.returncode == 0 and _status(out)["cmu"][0] == "skipped", res.stdout + res.stderr
    obj = json.loads(gj.read_text())
    obj["features"][0]["properties"]["isLocked"] = True     # an edit, as QuPath saves it
    gj.write_text(json.dumps(obj, indent=2))
    edited = gj.read_bytes()
    res = run_cli(*args)
    st = _status(out)["cmu"]
    assert res.returncode == 1 and st[1] == "settings-mismatch" and "tissue_source='detection'" in st[2]
    (out / "cmu.h5").unlink()
    res = run_cli(*args)
    assert res.returncode == 0 and _status(out)["cmu"][0] == "done", res.stdout + res.stderr
    assert gj.read_bytes() == edited                         # the input mask was not overwritten
    attrs = read_feature_file(out / "cmu.h5", features=False).attrs
    assert attrs["tissue_source"] == "geojson:" + hashlib.sha256(edited).hexdigest()


# ---- --remove-pen on real H&E with marker strokes drawn over it --------------------------------
#: transmittance of marker ink per RGB channel: ink over tissue multiplies its colour (Beer-Lambert)
INK = {"green": (0.20, 0.65, 0.35), "blue": (0.15, 0.30, 0.80), "black": (0.15, 0.15, 0.15)}


def _strokes(shape) -> dict:
    """Level-0 masks of three thick marker strokes: a diagonal, an arc (circling) and a line."""
    h, w = shape
    masks = {k: np.zeros((h, w), np.uint8) for k in INK}
    cv2.line(masks["green"], (0, 350), (w, 900), 1, thickness=470)
    cv2.ellipse(masks["blue"], (1150, 1550), (700, 420), 0, 160, 380, 1, thickness=470)
    cv2.line(masks["black"], (0, 2550), (w, 2550), 1, thickness=470)
    return {k: m.astype(bool) for k, m in masks.items()}


def _cover(mask: np.ndarray, coords, pad: float = 0.0) -> np.ndarray:
    """Fraction of each patch footprint (grown by ``pad`` level-0 px) covered by ``mask``."""
    ii = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    out = []
    for x, y in coords:
        x0, y0 = max(0, int(x - pad)), max(0, int(y - pad))
        x1, y1 = min(w, int(round(x + EXTENT + pad))), min(h, int(round(y + EXTENT + pad)))
        out.append((ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / max(1, (x1 - x0) * (y1 - y0)))
    return np.array(out)


def test_remove_pen_drops_inked_patches_and_keeps_clean_tissue(tmp_path, cmu_svs):
    s = openslide.OpenSlide(str(cmu_svs))
    img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    s.close()
    strokes = _strokes(img.shape[:2])
    inked = img.astype(np.float32)
    for name, m in strokes.items():
        inked[m] *= np.array(INK[name], np.float32)
    slides = tmp_path / "slides"
    write_pyramidal_tiff(slides / "clean.tiff", img, 0.499)
    write_pyramidal_tiff(slides / "inked.tiff", np.clip(inked, 0, 255).round().astype(np.uint8), 0.499)
    out = tmp_path / "f"
    res = run_cli("extract", str(slides), "--out", str(out), "--remove-pen", *FAST)
    assert res.returncode == 0, res.stdout + res.stderr
    with_pen = {sid: read_feature_file(out / f"{sid}.h5", features=False) for sid in ("clean", "inked")}
    assert with_pen["inked"].attrs["remove_pen"] and "green" in with_pen["inked"].attrs["pen_rule"]

    cfg = ExtractConfig(patch_size=224, thumbnails=False)     # the same grid without --remove-pen
    plain = {sid: plan_slide(slides / f"{sid}.tiff", cfg, None, tmp_path).grid.coords for sid in ("clean", "inked")}

    for flags, want in (((), plain["inked"]), (("--remove-pen",), with_pen["inked"].coords)):   # `info` agrees
        res = run_cli("info", str(slides / "inked.tiff"), "--patch-size", "224", "--json", *flags)
        assert res.returncode == 0 and json.loads(res.stdout)[0]["patches"] == len(want), flags

    # real H&E has no ink: the rule removes nothing from the clean slide
    assert with_pen["clean"].attrs["pen_fraction"] == 0.0
    assert np.array_equal(with_pen["clean"].coords, plain["clean"])
    clean = plain["clean"]
    kept = set(map(tuple, with_pen["inked"].coords.tolist()))
    for name, m in strokes.items():
        # tissue patches the stroke covers: (mostly) kept without --remove-pen, all removed with it;
        # ink dark enough to fall under detection's near-black floor was dropped already
        under = {tuple(c) for c, f in zip(clean.tolist(), _cover(m, clean)) if f >= 0.95}
        assert len(under & set(map(tuple, plain["inked"].tolist()))) >= 2, name
        assert not under & kept, f"{name} ink left in the grid"
    # ink over the glass was "tissue" without the rule, and is gone with it
    anyink = np.logical_or.reduce(list(strokes.values()))
    assert len(plain["inked"]) > len(clean)
    assert (_cover(anyink, with_pen["inked"].coords) < 0.5).all()
    # clean tissue patches away from every stroke are all kept
    far = [tuple(c) for c, f in zip(clean.tolist(), _cover(anyink, clean, pad=64)) if f == 0]
    assert len(far) >= 8 and set(far) <= kept
