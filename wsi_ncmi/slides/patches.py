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

The region of a run comes from OpenSlide's ``read_region`` or, for tiled JPEG levels, from the
raw-tile reader (``rawjpeg``), which reproduces ``read_region``'s pixels; the slicing and
resampling after it are the same code either way. ``runs`` and ``run_box`` are also used by the
device path (``device_cut``), which does the same cutting on the GPU.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from wsi_ncmi.slides.open import background_color, rgba_to_rgb
from wsi_ncmi.slides.rawjpeg import RawJpegReader, round_u8, shift_subpixel, subpixel_offset

RESAMPLE = Image.Resampling.BILINEAR
MAX_RUN = 16


class PatchReader:
    """Reads patches of one grid from one slide handle (one reader per worker process).

    ``raw``: a ``RawJpegReader`` for the read level, to read regions from the raw JPEG tiles
    instead of through OpenSlide (``slide`` may then be None; ``background`` gives its colour).
    """

    def __init__(self, slide, read_level: int, read_downsample: float, extent_x: float, extent_y: float,
                 patch_size: int, raw: RawJpegReader | None = None, background=None):
        self.slide = slide
        self.level = read_level
        self.ds = read_downsample
        self.ex, self.ey = extent_x, extent_y
        self.size = patch_size
        self.raw = raw
        self.bg = background if background is not None else background_color(slide)
        self.w, self.h = extent_x / read_downsample, extent_y / read_downsample   # read-level px
        self.direct = abs(self.w - patch_size) < 0.5 and abs(self.h - patch_size) < 0.5

    def read(self, x: int, y: int) -> np.ndarray:
        out = np.empty((1, self.size, self.size, 3), np.uint8)
        self._read_run(np.array([[x, y]], np.int64), out)
        return out[0]

    def runs(self, coords: np.ndarray):
        """(i, j) bounds of the row runs of ``coords``: side-by-side patches read as one region."""
        n = len(coords)
        i = 0
        while i < n:
            j = i + 1
            while (j < n and j - i < MAX_RUN and coords[j, 1] == coords[i, 1]
                   and 0 < coords[j, 0] - coords[j - 1, 0] <= self.ex + 1.5):
                j += 1
            yield i, j
            i = j

    def run_box(self, run: np.ndarray):
        """Region of a run in read-level px (ix0, iy0, width, height) and each patch's float offset in it."""
        d = self.ds
        lx = run[:, 0] / d
        ly = float(run[0, 1]) / d
        ix0, iy0 = int(math.floor(lx[0])), int(math.floor(ly))
        ix1 = int(math.ceil(lx[-1] + self.w)) + 1   # +1: bilinear needs the neighbour pixel
        iy1 = int(math.ceil(ly + self.h)) + 1
        return ix0, iy0, ix1 - ix0, iy1 - iy0, lx - ix0, ly - iy0

    def read_batch(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Patches for ``coords`` (N, 2) into ``out`` (N, P, P, 3), grouping row runs."""
        coords = np.asarray(coords, np.int64)
        if out is None:
            out = np.empty((len(coords), self.size, self.size, 3), np.uint8)
        for i, j in self.runs(coords):
            self._read_run(coords[i:j], out[i:j])
        return out

    def region(self, ix0: int, iy0: int, w: int, h: int) -> np.ndarray:
        """What ``read_region`` returns for read-level pixel (ix0, iy0), as RGB on the background."""
        loc, dx, dy = subpixel_offset(ix0, iy0, self.ds)
        if self.raw is None:
            return rgba_to_rgb(self.slide.read_region(loc, self.level, (w, h)), self.bg)
        if dx == 0.0 and dy == 0.0:
            return self.raw.region(ix0, iy0, w, h, self.bg)
        return round_u8(shift_subpixel(self.raw.region(ix0 - 1, iy0 - 1, w + 2, h + 2, self.bg), dx, dy))

    def _read_run(self, run: np.ndarray, out: np.ndarray) -> None:
        ix0, iy0, w, h, oxs, oy = self.run_box(run)
        region = self.region(ix0, iy0, w, h)
        if self.direct:
            ry = int(round(oy))
            for k in range(len(run)):
                rx = int(round(oxs[k]))
                out[k] = region[ry:ry + self.size, rx:rx + self.size]
            return
        img = Image.fromarray(region)
        for k in range(len(run)):
            ox = oxs[k]
            out[k] = np.asarray(img.resize((self.size, self.size), RESAMPLE,
                                           box=(ox, oy, ox + self.w, oy + self.h)))
