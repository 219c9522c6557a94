"""The raw-tile fast path gives OpenSlide's patches, on real slides, or is not used.

Every patch of the grid is read twice, through OpenSlide (``read_region``) and from the raw JPEG
tiles, and compared. Slides: the real CMU-1 H&E region (Aperio SVS, RGB-coded JPEG with shared
tables, 240 px tiles), generated JPEG TIFFs of position-coded colours at 0.25, 0.263 and 0.5 um/px
(odd level sizes, so OpenSlide's float downsamples are not integers and ``read_region`` shifts by a
sub-pixel fraction) and the CMU tissue re-written as an odd-sized pyramid. Targets cover direct
slicing and PIL resampling, at level 0 and at reduced levels; runs of patches straddle tiles.
"""

from pathlib import Path

import numpy as np
import pytest

from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.extract.plan import plan_slide
from wsi_ncmi.slides import PatchReader, open_slide, plan_grid, resolve_mpp
from wsi_ncmi.slides.device_cut import DeviceCutter, pack_batch
from wsi_ncmi.slides.open import level_downsamples, rgba_to_rgb, slide_bounds
from wsi_ncmi.slides.rawjpeg import RawJpegReader, probe_raw_jpeg
from wsi_ncmi.slides.tiff_writer import write_pyramidal_tiff

from conftest import make_pattern_slide

#: JPEG tolerance: the same libjpeg-turbo decodes both sides, so whole-pixel reads are identical;
#: OpenSlide's sub-pixel shift (cairo/pixman, 7-bit weights) differs from ours by rounding.
MAX_DIFF = 3
MEAN_DIFF = 0.25


@pytest.fixture(scope="module")
def slides(tmp_path_factory, cmu_svs):
    d = tmp_path_factory.mktemp("raw")
    out = {"cmu_svs": (cmu_svs, None)}
    for m in (0.25, 0.263, 0.5):
        out[f"pattern_{m}"] = (make_pattern_slide(d / f"p{m}.tiff", m), None)
    s = open_slide(cmu_svs)
    img = rgba_to_rgb(s.read_region((0, 0), 0, s.dimensions))[:, :2219]   # odd width: ds 2.0008, 4.0047
    out["cmu_pyramid"] = (write_pyramidal_tiff(d / "cmu_odd.tiff", img, 0.25, tile=256, quality=90), None)
    return out


CASES = [  # slide, target mpp, patch size
    ("cmu_svs", 0.5, 224), ("cmu_svs", 1.0, 128), ("cmu_svs", None, 224),
    ("pattern_0.25", 0.5, 224), ("pattern_0.263", 0.5, 224), ("pattern_0.263", 1.0, 128),
    ("pattern_0.263", None, 160), ("pattern_0.5", 0.6, 200),
    ("cmu_pyramid", 0.5, 224), ("cmu_pyramid", 1.0, 96), ("cmu_pyramid", 0.6, 200),
]


def _readers(path, target, size):
    slide = open_slide(path)
    mpp = resolve_mpp(slide, path, "s")
    grid = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, target or mpp.x, size, None)
    level, why = probe_raw_jpeg(path, slide, grid.read_level)
    assert level is not None, why
    args = (grid.read_level, grid.read_downsample, grid.extent_x, grid.extent_y, size)
    return grid, level, PatchReader(slide, *args), PatchReader(None, *args, raw=RawJpegReader(level),
                                                                  background=(255, 255, 255))


@pytest.mark.parametrize("name,target,size", CASES)
def test_every_patch_equals_openslide(slides, name, target, size):
    path, _ = slides[name]
    grid, level, ref, fast = _readers(path, target, size)
    a = ref.read_batch(grid.coords)
    b = fast.read_batch(grid.coords)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (name, diff.max(), diff.mean())
    # the comparison covers patches that straddle tile borders (at the read level)
    x0 = grid.coords[:, 0] / grid.read_downsample
    straddle = (x0 // level.tile_w) != ((x0 + ref.w - 1) // level.tile_w)
    assert straddle.any()
    # neighbouring patch rows share tiles: each is decoded about once, not once per patch
    n_tiles = len(level.offsets)
    assert fast.raw.decoded <= 1.2 * n_tiles


def test_cases_cover_both_cutting_paths_and_subpixel_levels(slides):
    seen = set()
    for name, target, size in CASES:
        grid, _, ref, _ = _readers(slides[name][0], target, size)
        seen.add(("direct" if ref.direct else "resample", grid.read_level > 0,
                  grid.read_downsample != round(grid.read_downsample)))
    assert {s[0] for s in seen} == {"direct", "resample"}
    assert any(s[1] and s[2] for s in seen)          # a reduced level with a non-integer downsample


@pytest.mark.parametrize("name,target,size", [("cmu_svs", 1.0, 128), ("pattern_0.263", 0.5, 224),
                                              ("cmu_pyramid", 0.5, 224)])
def test_device_path_on_cpu_tensors_equals_openslide(slides, name, target, size):
    """The GPU path's code (standalone streams, torchvision decode, torch cutting) run on the CPU."""
    path, _ = slides[name]
    grid, _, ref, fast = _readers(path, target, size)
    coords = grid.coords[:24]
    packed = pack_batch(fast, coords)
    cutter = DeviceCutter("cpu")
    out = cutter(0, packed).numpy()
    assert cutter.cpu_decode == {0: False}            # torchvision's decoder agreed on the first tile
    diff = np.abs(out.astype(np.int16) - ref.read_batch(coords).astype(np.int16))
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


def test_unsupported_levels_fall_back_with_a_reason(openslide_fixtures, tmp_path):
    boxes = openslide_fixtures / "boxes.tiff"                   # deflate-compressed generic TIFF
    level, why = probe_raw_jpeg(boxes, open_slide(boxes), 0)
    assert level is None and "DEFLATE" in why
    png = tmp_path / "roi.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    level, why = probe_raw_jpeg(png, open_slide(png), 0)
    assert level is None and "vendor" in why


def test_plan_records_the_reader(slides, tmp_path):
    path, _ = slides["pattern_0.5"]
    for reader, expected in (("auto", "raw-jpeg"), ("openslide", "openslide")):
        cfg = ExtractConfig(slides=[str(path)], out=str(tmp_path), reader=reader, thumbnails=False, min_tissue=0)
        plan = plan_slide(Path(path), cfg, None, tmp_path)
        assert plan.reader == plan.attrs["reader"] == expected
    with pytest.raises(Exception, match="--reader"):
        ExtractConfig(reader="fast").validate()
