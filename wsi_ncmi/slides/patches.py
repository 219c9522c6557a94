"""Reading exact-physical-size patches from one open slide.

A patch at level-0 ``(x, y)`` covers the float box ``[x, x + extent)`` (see ``grid``). At the read
level that box is ``[x / ds, (x + extent) / ds)``. Two ways to produce the ``patch_size`` output:

* the box is ``patch_size`` read-level px wide (within half a pixel: the read level *is* the
  target mpp, e.g. OpenSlide's 2.000221 downsample of an odd-sized level): the pixels are sliced
  out directly, at most half a read-level pixel from the float position, with no resampling blur;
* otherwise PIL resamples exactly that float box to ``patch_size`` (``Image.resize(box=...)``,
  bilinear with support scaled when shrinking, i.e. antialiased).

Patches that sit side by side in a grid row are read with one ``read_region`` call per run (up to
``MAX_RUN`` patches): each JPEG tile is decoded once instead of up to four times, about 3x fewer
decodes. A read error propagates; it is never replaced by a white patch.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from wsi_ncmi.slides.open import background_color, rgba_to_rgb

RESAMPLE = Image.Resampling.BILINEAR
MAX_RUN = 16


class PatchReader:
    """Reads patches of one grid from one slide handle (one reader per worker process)."""

    def __init__(self, slide, read_level: int, read_downsample: float, extent_x: float, extent_y: float,
                 patch_size: int):
        self.slide = slide
        self.level = read_level
        self.ds = read_downsample
        self.ex, self.ey = extent_x, extent_y
        self.size = patch_size
        self.bg = background_color(slide)
        self.w, self.h = extent_x / read_downsample, extent_y / read_downsample   # read-level px
        self.direct = abs(self.w - patch_size) < 0.5 and abs(self.h - patch_size) < 0.5

    def read(self, x: int, y: int) -> np.ndarray:
        out = np.empty((1, self.size, self.size, 3), np.uint8)
        self._read_run(np.array([[x, y]], np.int64), out)
        return out[0]

    def read_batch(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Patches for ``coords`` (N, 2) into ``out`` (N, P, P, 3), grouping row runs."""
        coords = np.asarray(coords, np.int64)
        n = len(coords)
        if out is None:
            out = np.empty((n, self.size, self.size, 3), np.uint8)
        i = 0
        while i < n:
            j = i + 1
            while (j < n and j - i < MAX_RUN and coords[j, 1] == coords[i, 1]
                   and 0 < coords[j, 0] - coords[j - 1, 0] <= self.ex + 1.5):
                j += 1
            self._read_run(coords[i:j], out[i:j])
            i = j
        return out

    def _read_run(self, run: np.ndarray, out: np.ndarray) -> None:
        d = self.ds
        lx = run[:, 0] / d
        ly = float(run[0, 1]) / d
        ix0, iy0 = int(math.floor(lx[0])), int(math.floor(ly))
        ix1 = int(math.ceil(lx[-1] + self.w)) + 1   # +1: bilinear needs the neighbour pixel
        iy1 = int(math.ceil(ly + self.h)) + 1
        region = rgba_to_rgb(self.slide.read_region((round(ix0 * d), round(iy0 * d)), self.level,
                                                    (ix1 - ix0, iy1 - iy0)), self.bg)
        oy = ly - iy0
        if self.direct:
            ry = int(round(oy))
            for k in range(len(run)):
                rx = int(round(lx[k] - ix0))
                out[k] = region[ry:ry + self.size, rx:rx + self.size]
            return
        img = Image.fromarray(region)
        for k in range(len(run)):
            ox = lx[k] - ix0
            out[k] = np.asarray(img.resize((self.size, self.size), RESAMPLE,
                                           box=(ox, oy, ox + self.w, oy + self.h)))
