"""Patch geometry on real pyramidal TIFFs whose pixels encode their physical position."""

import numpy as np
import pytest

from wsi_ncmi.slides import PatchReader, open_slide, plan_grid, resolve_mpp
from wsi_ncmi.slides.grid import choose_read_level
from wsi_ncmi.slides.open import level_downsamples, slide_bounds
from wsi_ncmi.slides.tissue import TissueParams, tissue_mask_for_slide

from conftest import make_pattern_slide, make_tissue_slide, pattern


@pytest.fixture(scope="module")
def pattern_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("pattern")
    return {m: make_pattern_slide(d / f"p{m}.tiff", m) for m in (0.25, 0.263, 0.5)}


@pytest.mark.parametrize("src_mpp", [0.25, 0.263, 0.5])
@pytest.mark.parametrize("target_mpp,size", [(0.5, 224), (1.0, 128), (0.263, 96)])
def test_patch_content_matches_physical_position(pattern_slides, src_mpp, target_mpp, size):
    path = pattern_slides[src_mpp]
    slide = open_slide(path)
    mpp = resolve_mpp(slide, path, "p")
    grid = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, target_mpp, size, None)
    # exact physical extent, never truncated: e.g. 224 px @ 0.5 on 0.263 um/px = 425.86 level-0 px
    assert grid.extent_x == pytest.approx(size * target_mpp / src_mpp)
    # finest level not coarser than the target (level 0 when the target is finer than the scan)
    assert grid.read_level == 0 or grid.read_downsample * src_mpp <= target_mpp * 1.01
    reader = PatchReader(slide, grid.read_level, grid.read_downsample, grid.extent_x, grid.extent_y, size)
    idx = np.linspace(0, len(grid) - 1, 5).astype(int)
    j = (np.arange(size) + 0.5) * target_mpp
    for k in idx:
        x0, y0 = grid.coords[k]
        patch = reader.read(int(x0), int(y0)).astype(float)
        assert patch.shape == (size, size, 3)
        expected = pattern(x0 * src_mpp + j[None, :], y0 * src_mpp + j[:, None])
        err = np.abs(patch - expected).mean(axis=(0, 1))
        # JPEG noise is ~1-2 levels; a 2% scale error or a 4 um offset is several times this
        assert err[0] < 3 and err[1] < 3, (k, err)
        assert err[2] < 12, (k, err)


def test_wrong_geometry_would_be_caught(pattern_slides):
    """The content check above is sensitive: a 5% scale error (e.g. 0.263 read as 0.25) fails it."""
    path = pattern_slides[0.263]
    slide = open_slide(path)
    size, target = 224, 0.5
    wrong_extent = size * target / 0.25
    reader = PatchReader(slide, 0, 1.0, wrong_extent, wrong_extent, size)
    x0, y0 = 1000, 800
    patch = reader.read(x0, y0).astype(float)
    j = (np.arange(size) + 0.5) * target
    expected = pattern(x0 * 0.263 + j[None, :], y0 * 0.263 + j[:, None])
    assert np.abs(patch - expected).mean(axis=(0, 1))[2] > 25


def test_grid_is_exact_float_steps(pattern_slides):
    slide = open_slide(pattern_slides[0.263])
    mpp = resolve_mpp(slide, "p", "p")
    g = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, 0.5, 256, None)
    ex = 256 * 0.5 / 0.263
    xs = np.unique(g.coords[:, 0])
    assert np.abs(xs - np.round(np.arange(len(xs)) * ex)).max() == 0
    assert xs[-1] + ex <= slide.dimensions[0] + 1e-6          # every patch lies inside the slide
    assert len(xs) == int(slide.dimensions[0] // ex)


def test_read_level_choice_uses_float_downsamples():
    ds = [1.0, 2.0, 4.016129, 8.086]   # boxes.tiff's real downsamples
    assert choose_read_level(ds, 4.0) == (2, 4.016129)     # 0.4% coarser: accepted
    assert choose_read_level(ds, 3.9) == (1, 2.0)          # 3% coarser: next finer level
    assert choose_read_level(ds, 0.5) == (0, 1.0)


def test_tissue_mask_and_grid_follow_known_regions(tmp_path):
    rects = [(200, 200, 600, 400), (1100, 700, 500, 500)]
    p = make_tissue_slide(tmp_path / "t.tiff", 0.25, rects)
    slide = open_slide(p)
    mpp = resolve_mpp(slide, p, "t")
    tm = tissue_mask_for_slide(slide, mpp.mean, TissueParams())
    # mask area equals the rectangles' area within a border pixel
    mask_um2 = tm.mask.sum() * tm.scale_x * tm.scale_y * mpp.x * mpp.y
    true_um2 = sum(w * h for _, _, w, h in rects)
    assert abs(mask_um2 - true_um2) / true_um2 < 0.08
    g = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, 0.5, 128, tm, min_tissue=0.5)
    centres_um = (g.coords + g.extent_x / 2) * mpp.x
    inside = np.zeros(len(g), bool)
    tol = 8.0  # one mask pixel: a half-covered patch's centre can sit on the edge
    for x, y, w, h in [(x - tol, y - tol, w + 2 * tol, h + 2 * tol) for x, y, w, h in rects]:
        inside |= (centres_um[:, 0] > x) & (centres_um[:, 0] < x + w) & (centres_um[:, 1] > y) & (centres_um[:, 1] < y + h)
    assert inside.all()
    # patches of 64 um fully inside the rectangles are all kept
    full = sum(int(w // 64) * int(h // 64) for _, _, w, h in rects)
    assert len(g) >= full * 0.9
    g_strict = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, 0.5, 128, tm, min_tissue=0.99)
    g_loose = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, 0.5, 128, tm, min_tissue=0.01)
    assert len(g_strict) < len(g) < len(g_loose)


def test_blank_slide_has_no_tissue(tmp_path):
    p = make_tissue_slide(tmp_path / "blank.tiff", 0.5, [])
    slide = open_slide(p)
    tm = tissue_mask_for_slide(slide, 0.5, TissueParams())
    assert not tm.mask.any()
