import pytest

from wsi_ncmi.errors import SlideError, WsiNcmiError
from wsi_ncmi.slides import load_mpp_csv, open_slide, resolve_mpp
from wsi_ncmi.slides.mpp import metadata_mpp

from conftest import make_pattern_slide


class FakeSlide:  # only .properties is read by resolve_mpp; a dict is the real interface
    def __init__(self, props):
        self.properties = props


def test_metadata_sources_in_order():
    assert metadata_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}) == (0.25, 0.25, "openslide.mpp-x")
    # TIFF resolution in inches, which OpenSlide does not convert
    x, y, key = metadata_mpp({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"})
    assert key == "tiff.XResolution" and x == pytest.approx(0.25)
    assert metadata_mpp({"aperio.MPP": "0.4990"}) == (0.499, 0.499, "aperio.MPP")
    assert metadata_mpp({"openslide.objective-power": "20"}) is None  # never guessed from magnification


def test_real_tiff_mpp_from_centimetre_tags(tmp_path):
    p = make_pattern_slide(tmp_path / "s.tiff", 0.263, 300, 200)
    s = open_slide(p)
    m = resolve_mpp(s, p, "s")
    assert m.x == pytest.approx(0.263, rel=1e-6) and m.source == "metadata:openslide.mpp-x"


def test_csv_beats_metadata_and_flag_is_fallback(tmp_path):
    s = FakeSlide({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"})
    assert resolve_mpp(s, "a.svs", "a", {"a": 0.5}).source == "csv"
    assert resolve_mpp(s, "a.svs", "a", {"other": 0.5}, default_mpp=1.0).x == 0.25
    assert resolve_mpp(FakeSlide({}), "a.svs", "a", None, default_mpp=0.3).source == "flag:--slide-mpp"


def test_missing_and_implausible_mpp_name_the_fix():
    with pytest.raises(SlideError) as e:
        resolve_mpp(FakeSlide({}), "x.tiff", "x")
    assert e.value.reason == "missing-mpp" and "--slide-mpp" in str(e.value) and "x.tiff" in str(e.value)
    boxes = {"openslide.mpp-x": "352.77", "openslide.mpp-y": "352.77"}  # a 72-dpi default tag
    with pytest.raises(SlideError) as e:
        resolve_mpp(FakeSlide(boxes), "b.tiff", "b")
    assert e.value.reason == "implausible-mpp" and "352.8" in str(e.value)
    assert resolve_mpp(FakeSlide(boxes), "b.tiff", "b", default_mpp=0.5).x == 0.5


def test_mpp_csv_errors(tmp_path):
    good = tmp_path / "m.csv"
    good.write_text("slide_id,mpp\na,0.25\nb, 0.5\n")
    assert load_mpp_csv(good) == {"a": 0.25, "b": 0.5}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,mpp\na,0.25\n")
    with pytest.raises(WsiNcmiError, match="slide_id,mpp"):
        load_mpp_csv(bad)
    bad.write_text("slide_id,mpp\na,fast\n")
    with pytest.raises(WsiNcmiError, match=r"bad.csv:2"):
        load_mpp_csv(bad)
    bad.write_text("slide_id,mpp\na,250\n")
    with pytest.raises(WsiNcmiError, match="plausible"):
        load_mpp_csv(bad)
