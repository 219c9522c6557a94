"""The patch grid: which level-0 squares become patches, and how to read them exactly.

A patch of ``patch_size`` px at ``target_mpp`` covers ``patch_size * target_mpp / mpp`` level-0
px, a float (256 px at 0.5 um/px on a 0.263 um/px scan is 486.69 level-0 px). The grid steps by
that float extent from the scanned area's origin; each cell's top-left is rounded to an integer
level-0 pixel (the ``coords`` saved in HDF5) and the patch is read over exactly
``[x, x + extent)``. Nothing is rounded to a "magnification" and no level downsample is cast to int.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_ncmi.slides.mpp import Mpp

#: A level at most this much coarser than the target is still used: a 1% upsample is invisible,
#: while falling back to the next finer level costs 4x the pixels read.
LEVEL_SLACK = 0.01


@dataclass
class PatchGrid:
    coords: np.ndarray            # (N, 2) int64, level-0 top-left of each kept patch
    tissue_fraction: np.ndarray   # (N,) float32
    patch_size: int               # output px
    target_mpp: float
    extent_x: float               # level-0 px covered by one patch
    extent_y: float
    read_level: int
    read_downsample: float
    n_cells: int                  # candidate cells before the tissue filter

    def __len__(self) -> int:
        return len(self.coords)


def choose_read_level(downsamples: list[float], wanted: float) -> tuple[int, float]:
    """Finest level not coarser than ``wanted`` (level-0 px per output px), with 1% slack."""
    level = max((i for i, d in enumerate(downsamples) if d <= wanted * (1 + LEVEL_SLACK)), default=0)
    return level, float(downsamples[level])


def plan_grid(bounds: tuple[int, int, int, int], downsamples: list[float], mpp: Mpp, target_mpp: float,
              patch_size: int, tissue=None, min_tissue: float = 0.25) -> PatchGrid:
    """Lay the grid over ``bounds`` (x, y, w, h in level-0 px) and keep cells with enough tissue.

    ``tissue`` is a ``TissueMask`` (or None to keep every cell); a cell is kept when the
    fraction of its area covered by tissue is at least ``min_tissue`` (and above zero);
    ``min_tissue=0`` keeps every cell of a slide that has tissue (whole-ROI tiling).
    """
    ex = patch_size * target_mpp / mpp.x
    ey = patch_size * target_mpp / mpp.y
    bx, by, bw, bh = bounds
    nx, ny = int(math.floor(bw / ex + 1e-9)), int(math.floor(bh / ey + 1e-9))
    level, ds = choose_read_level(downsamples, min(ex, ey) / patch_size)
    if nx == 0 or ny == 0:
        empty = np.zeros((0, 2), np.int64)
        return PatchGrid(empty, np.zeros(0, np.float32), patch_size, target_mpp, ex, ey, level, ds, 0)
    xs = bx + np.round(np.arange(nx) * ex).astype(np.int64)
    ys = by + np.round(np.arange(ny) * ey).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)                     # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if tissue is None:
        frac = np.ones(len(coords), np.float32)
    else:
        frac = _coverage(tissue.mask, tissue.scale_x, tissue.scale_y, coords, ex, ey)
    keep = (frac >= min_tissue) & (frac > 0) if min_tissue > 0 else np.ones(len(coords), bool)
    return PatchGrid(coords[keep], frac[keep], patch_size, target_mpp, ex, ey, level, ds, len(coords))


def _coverage(mask: np.ndarray, sx: float, sy: float, coords: np.ndarray, ex: float, ey: float) -> np.ndarray:
    """Fraction of each patch's footprint covered by the mask, from an integral image."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(coords[:, 0] / sx).astype(np.int64), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / sy).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + ex) / sx).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + ey) / sy).astype(np.int64), y0 + 1), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (s / area).astype(np.float32)
