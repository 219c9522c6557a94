"""Reading exact-physical-size patches from one open slide.

For a patch at level-0 ``(x, y)`` with float extent ``(ex, ey)``, the integer region of the read
level that covers the float box is read once, and PIL resamples exactly that float box to
``patch_size`` px (``Image.resize(box=...)``). When the read level already has the target mpp and
the box is pixel-aligned, the region is returned untouched. A read error propagates: it is never
replaced by a white patch.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from wsi_ncmi.slides.open import background_color, rgba_to_rgb

RESAMPLE = Image.Resampling.BILINEAR  # PIL scales the filter support when shrinking: antialiased


class PatchReader:
    """Reads patches of one grid from one slide handle (one per worker process)."""

    def __init__(self, slide, read_level: int, read_downsample: float, extent_x: float, extent_y: float,
                 patch_size: int):
        self.slide = slide
        self.level = read_level
        self.ds = read_downsample
        self.ex, self.ey = extent_x, extent_y
        self.size = patch_size
        self.bg = background_color(slide)
        self.level_w, self.level_h = slide.level_dimensions[read_level]

    def read(self, x: int, y: int) -> np.ndarray:
        d = self.ds
        lx, ly = x / d, y / d                  # float top-left in read-level px
        w, h = self.ex / d, self.ey / d        # float size in read-level px
        ix, iy = int(math.floor(lx)), int(math.floor(ly))
        aligned = abs(lx - ix) < 1e-6 and abs(ly - iy) < 1e-6 and abs(w - self.size) < 1e-6 and abs(h - self.size) < 1e-6
        if aligned:
            region = self.slide.read_region((x, y), self.level, (self.size, self.size))
            return rgba_to_rgb(region, self.bg)
        rw = int(math.ceil(lx + w)) - ix + 1   # +1: bilinear needs the neighbour pixel
        rh = int(math.ceil(ly + h)) - iy + 1
        region = self.slide.read_region((round(ix * d), round(iy * d)), self.level, (rw, rh))
        img = Image.fromarray(rgba_to_rgb(region, self.bg))
        out = img.resize((self.size, self.size), RESAMPLE, box=(lx - ix, ly - iy, lx - ix + w, ly - iy + h))
        return np.asarray(out)
