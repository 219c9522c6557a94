"""Tissue detection on a low-resolution thumbnail, or a tissue GeoJSON in its place.

Method (the CLAM/TRIDENT family, with sizes in microns so it behaves the same at any scan
resolution): the HSV saturation channel of a thumbnail at ``mask_mpp`` um/px is median-blurred
and thresholded with Otsu's method, the threshold clamped to ``[min_saturation, max_saturation]``
(Otsu alone splits an all-tissue ROI in two and finds "tissue" in an empty slide); near-black
pixels (scanner borders, pen) are dropped; a closing joins nearby fragments; regions smaller than
``min_region_um2`` are removed and holes smaller than ``max_hole_um2`` are filled.

A GeoJSON of tissue polygons (``slides/geojson.py``; our own export, edited in QuPath) may replace
detection per slide, and marker ink (``slides/pen.py``) may be subtracted from either mask.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from wsi_ncmi.slides.geojson import (FIX, GeoJSONError, mask_to_geojson, polygons_bounds, rasterize_polygons,
                                     read_tissue_geojson)
from wsi_ncmi.slides.open import background_color, level_downsamples, rgba_to_rgb
from wsi_ncmi.slides.pen import ink_mask


@dataclass(frozen=True)
class TissueParams:
    """Tissue-detection settings; all sizes are physical so they do not depend on the scanner."""

    mask_mpp: float = 8.0            # thumbnail resolution (um/px) the mask is computed at
    blur_um: float = 56.0            # median-blur window
    min_saturation: int = 15         # Otsu threshold floor (0-255): background stays background
    max_saturation: int = 45         # Otsu threshold cap: pale tissue in all-tissue ROIs is kept
    min_value: int = 30              # HSV value below this is black border/pen, not tissue
    close_um: float = 32.0           # morphological closing window
    min_region_um2: float = 20_000.0  # drop tissue fragments smaller than this (0.02 mm^2)
    max_hole_um2: float = 20_000.0    # fill holes smaller than this

    def to_dict(self) -> dict:
        return {"method": "hsv-saturation-otsu", **asdict(self)}


@dataclass
class TissueMask:
    """Boolean tissue mask; pixel (i, j) covers level-0 px [j*scale_x, (j+1)*scale_x) etc."""

    mask: np.ndarray
    scale_x: float
    scale_y: float
    threshold: float       # saturation threshold of detection (NaN for a GeoJSON mask)
    thumbnail: np.ndarray  # the RGB thumbnail the mask was computed on (for pictures)
    source: str = "detection"   # or "geojson:<sha256 of the file>"
    pen_fraction: float = 0.0   # fraction of the mask removed as marker ink (--remove-pen)

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def read_thumbnail(slide, mpp_mean: float, thumb_mpp: float, tile: int = 1024):
    """Read the whole slide at ``thumb_mpp`` um/px, tile by tile, with exact area resampling.

    Reads from the finest level not coarser than the thumbnail and never allocates a full
    level at once (a slide with no pyramid would otherwise need tens of GB). Returns
    ``(rgb, scale_x, scale_y)`` with scale = level-0 px per thumbnail px.
    """
    w0, h0 = slide.dimensions
    ratio = max(1.0, thumb_mpp / mpp_mean)
    ow, oh = max(1, round(w0 / ratio)), max(1, round(h0 / ratio))
    sx, sy = w0 / ow, h0 / oh
    ds = level_downsamples(slide)
    level = max((i for i, d in enumerate(ds) if d <= min(sx, sy) * 1.01), default=0)
    d = ds[level]
    lw, lh = slide.level_dimensions[level]
    bg = background_color(slide)
    out = np.empty((oh, ow, 3), dtype=np.uint8)
    for ty in range(0, oh, tile):
        for tx in range(0, ow, tile):
            tw, th = min(tile, ow - tx), min(tile, oh - ty)
            # float box of this output tile in level coordinates
            bx0, by0 = tx * sx / d, ty * sy / d
            bx1, by1 = min((tx + tw) * sx / d, lw), min((ty + th) * sy / d, lh)
            ix0, iy0 = int(math.floor(bx0)), int(math.floor(by0))
            ix1, iy1 = min(lw, int(math.ceil(bx1))), min(lh, int(math.ceil(by1)))
            region = slide.read_region((round(ix0 * d), round(iy0 * d)), level,
                                       (max(1, ix1 - ix0), max(1, iy1 - iy0)))
            rgb = Image.fromarray(rgba_to_rgb(region, bg))
            small = rgb.resize((tw, th), Image.Resampling.BOX,
                               box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0))
            out[ty:ty + th, tx:tx + tw] = np.asarray(small)
    return out, sx, sy


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def detect_tissue(rgb: np.ndarray, mask_mpp: float, params: TissueParams = TissueParams()):
    """Tissue mask of an RGB thumbnail taken at ``mask_mpp`` um/px. Returns (mask, threshold)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], _odd(params.blur_um / mask_mpp))
    val = hsv[..., 2]
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = float(min(max(otsu, params.min_saturation), params.max_saturation))
    mask = ((sat > thr) & (val >= params.min_value)).astype(np.uint8)
    k = _odd(params.close_um / mask_mpp)
    if k > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    px_area = mask_mpp * mask_mpp
    mask = _remove_small(mask, params.min_region_um2 / px_area)
    holes = _remove_small(1 - mask, params.max_hole_um2 / px_area, keep_border=True)
    return (1 - holes).astype(bool), thr


def _remove_small(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """Zero the 8-connected components of ``mask`` smaller than ``min_px`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(np.uint8)
    area = stats[:, cv2.CC_STAT_AREA]
    keep = area >= min_px
    if keep_border:  # background touching the border is outside tissue, not a hole
        h, w = mask.shape
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
        keep |= (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    keep[0] = False
    return keep[labels].astype(np.uint8)


def tissue_mask_for_slide(slide, mpp_mean: float, params: TissueParams = TissueParams(),
                          geojson: str | Path | None = None, remove_pen: bool = False) -> TissueMask:
    """The tissue mask of a slide on the ``params.mask_mpp`` grid.

    ``geojson``: a tissue GeoJSON (e.g. edited in QuPath) whose polygons replace detection; the
    thumbnail is still read (pictures, ink). ``remove_pen``: subtract green/blue/black marker ink
    (``slides/pen.py``) from either mask. Raises ``GeoJSONError`` for an unusable file.
    """
    thumb, sx, sy = read_thumbnail(slide, mpp_mean, params.mask_mpp)
    mask_mpp = mpp_mean * (sx + sy) / 2.0
    if geojson is None:
        mask, thr = detect_tissue(thumb, mask_mpp, params)
        source = "detection"
    else:
        mask, digest = _mask_from_geojson(Path(geojson), thumb.shape[:2], sx, sy, slide.dimensions)
        thr, source = float("nan"), f"geojson:{digest}"
    pen_fraction = 0.0
    if remove_pen:
        ink = ink_mask(thumb, mask_mpp) & mask
        pen_fraction = float(ink.sum() / max(1, mask.sum()))
        mask = mask & ~ink   # no small-region pass after: tissue a stroke cut off is still tissue
    return TissueMask(mask=mask, scale_x=sx, scale_y=sy, threshold=thr, thumbnail=thumb, source=source,
                      pen_fraction=pen_fraction)


def _mask_from_geojson(path: Path, shape, sx: float, sy: float, dims) -> tuple[np.ndarray, str]:
    polygons, digest = read_tissue_geojson(path)
    mask = rasterize_polygons(polygons, shape, sx, sy)
    if polygons and not mask.any():
        x0, y0, x1, y1 = polygons_bounds(polygons)
        w0, h0 = dims
        if x1 < 0 or y1 < 0 or x0 > w0 or y0 > h0:
            raise GeoJSONError(f"{path}: its polygons ({x0:.0f}-{x1:.0f} x {y0:.0f}-{y1:.0f}) lie outside the "
                               f"slide ({w0} x {h0} level-0 px); {FIX}")
    return mask, digest


def tissue_geojson(tm: TissueMask, slide_id: str) -> dict:
    """Tissue outlines as a GeoJSON FeatureCollection in level-0 px (QuPath-importable)."""
    return mask_to_geojson(tm.mask, tm.scale_x, tm.scale_y, slide_id)
