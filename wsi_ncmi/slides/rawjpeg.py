"""Raw-tile fast path: read a tiled JPEG TIFF/SVS level's compressed tiles directly.

Why: for a JPEG-tiled level OpenSlide decodes each tile with libjpeg-turbo, converts it to
premultiplied ARGB, paints it into the region with cairo, and this project then turns the RGBA
back into RGB. Here the tiles' byte ranges come from the TIFF (``TileOffsets``/``TileByteCounts``
and the shared ``JPEGTables``, via tifffile) and are decoded by the same libjpeg-turbo
(``imagecodecs.jpeg8_decode``, islow IDCT and fancy upsampling like OpenSlide) straight into RGB,
with a per-worker cache of decoded tiles so that a tile shared by two patch rows is decoded once.

Exactness, the part that matters: the region must equal what ``read_region`` returns.

* Colour: OpenSlide decodes a TIFF JPEG tile in the colour space of the TIFF ``Photometric`` tag
  (Aperio's RGB-coded tiles with component ids 0,1,2 are RGB; tifffile's are YCbCr); so does this.
* Geometry: ``read_region((X, Y), level, size)`` starts at level position ``X / ds``. When that is
  not a whole pixel (a level whose float downsample is not an integer) OpenSlide shifts the level
  image by the fraction with bilinear interpolation (cairo); ``shift_subpixel`` does the same.
* Outside the level (and the padding of edge tiles) OpenSlide is transparent, which becomes the
  background colour; so it does here.

Anything else (other vendors, non-JPEG or non-tiled levels, missing tiles, a first tile whose
decode does not match OpenSlide's) is refused by ``probe_raw_jpeg`` with a reason, and the slide
is read through OpenSlide.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

#: OpenSlide vendors whose levels are plain top-level TIFF pages (what this reader understands).
VENDORS = frozenset({"aperio", "generic-tiff"})
#: Largest difference (grey levels) allowed between our decode of the first tile and OpenSlide's.
VERIFY_TOLERANCE = 2
#: Decoded tiles kept per reader (bytes); two or three tile rows of a large level.
CACHE_BYTES = 96 << 20

_JPEG, _RGB, _YCBCR = 7, 2, 6
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"   # APP14, transform 0 = no colour transform


@dataclass(frozen=True)
class RawJpegLevel:
    """Where one OpenSlide level's JPEG tiles are in the file (picklable; sent to workers)."""

    path: str
    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple
    counts: tuple
    tables: bytes | None
    colorspace: str            # "RGB" or "YCBCR" (from the Photometric tag)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    def standalone_stream(self, raw: bytes) -> bytes:
        """A complete JPEG for decoders that take no separate tables (nvjpeg, torchvision).

        The abbreviated tile stream is merged with the tables (the tables' EOI and the tile's SOI
        dropped); RGB-coded tiles get an Adobe APP14 marker with transform 0 so that a decoder
        does not apply YCbCr->RGB to them.
        """
        body = raw[2:]
        if self.tables:
            body = self.tables[2:-2] + body
        head = b"\xff\xd8" + (_ADOBE_RGB if self.colorspace == "RGB" else b"")
        return head + body


class RawJpegReader:
    """Decodes tiles of one ``RawJpegLevel`` (one per worker process) and assembles regions."""

    def __init__(self, level: RawJpegLevel, cache_bytes: int = CACHE_BYTES):
        import imagecodecs

        self.level = level
        self._decode = imagecodecs.jpeg8_decode
        self._fd = os.open(level.path, os.O_RDONLY)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_tiles = max(8, cache_bytes // (level.tile_w * level.tile_h * 3))
        self.decoded = 0   # tiles decoded (not served from the cache), for tests and benchmarks

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def raw_tile(self, index: int) -> bytes:
        lv = self.level
        data = os.pread(self._fd, lv.counts[index], lv.offsets[index])
        if len(data) != lv.counts[index]:
            raise OSError(f"{lv.path}: tile {index} of page {lv.page} is truncated "
                          f"({len(data)} of {lv.counts[index]} bytes); the file is damaged: copy it again")
        return data

    def tile(self, index: int) -> np.ndarray:
        t = self._cache.get(index)
        if t is not None:
            self._cache.move_to_end(index)
            return t
        lv = self.level
        t = self._decode(self.raw_tile(index), tables=lv.tables, colorspace=lv.colorspace, outcolorspace="RGB")
        self.decoded += 1
        self._cache[index] = t
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return t

    def region(self, ix0: int, iy0: int, w: int, h: int, bg=(255, 255, 255)) -> np.ndarray:
        """Level pixels ``[ix0, ix0 + w) x [iy0, iy0 + h)`` as (h, w, 3) uint8; background outside."""
        out = np.empty((h, w, 3), np.uint8)
        out[:] = np.asarray(bg, np.uint8)
        paste_tiles(out, self.tile, self.level, ix0, iy0)
        return out


def tiles_in(level: RawJpegLevel, ix0: int, iy0: int, w: int, h: int) -> list[tuple[int, int, int]]:
    """(index, tile x, tile y) of every tile overlapping the region, clipped to the level."""
    x0, y0 = max(ix0, 0), max(iy0, 0)
    x1, y1 = min(ix0 + w, level.width), min(iy0 + h, level.height)
    if x1 <= x0 or y1 <= y0:
        return []
    tw, th, n = level.tile_w, level.tile_h, level.tiles_across
    return [(ty * n + tx, tx, ty) for ty in range(y0 // th, (y1 - 1) // th + 1)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1)]


def paste_tiles(out, get_tile, level: RawJpegLevel, ix0: int, iy0: int) -> None:
    """Copy the decoded tiles into ``out`` (numpy or torch, (h, w, 3)), clipped to the level size.

    ``get_tile(index)`` returns a decoded (tile_h, tile_w, 3) tile; edge tiles' padding beyond the
    level is never copied (OpenSlide shows it as transparent).
    """
    h, w = out.shape[:2]
    tw, th = level.tile_w, level.tile_h
    for idx, tx, ty in tiles_in(level, ix0, iy0, w, h):
        t = get_tile(idx)
        gx0, gy0 = tx * tw, ty * th
        sx0, sy0 = max(ix0, gx0), max(iy0, gy0)
        sx1 = min(ix0 + w, gx0 + tw, level.width, gx0 + t.shape[1])
        sy1 = min(iy0 + h, gy0 + th, level.height, gy0 + t.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - iy0:sy1 - iy0, sx0 - ix0:sx1 - ix0] = t[sy0 - gy0:sy1 - gy0, sx0 - gx0:sx1 - gx0]


def subpixel_offset(ix0: int, iy0: int, ds: float) -> tuple[tuple[int, int], float, float]:
    """OpenSlide location for level pixel (ix0, iy0) and the fraction OpenSlide is off by.

    ``read_region`` takes level-0 integers ``X = round(ix0 * ds)``; it then reads from level
    position ``X / ds = ix0 + dx`` (|dx| <= 0.5 / ds), interpolating when dx is not zero.
    """
    X, Y = round(ix0 * ds), round(iy0 * ds)
    dx, dy = X / ds - ix0, Y / ds - iy0
    if abs(dx) < 1e-9:
        dx = 0.0
    if abs(dy) < 1e-9:
        dy = 0.0
    return (X, Y), dx, dy


def shift_subpixel(padded, dx: float, dy: float):
    """Bilinear sample of ``padded`` (h + 2, w + 2, 3; one pixel of margin all round) at +dx, +dy.

    Works on numpy and torch arrays alike; returns float (h, w, 3). The fraction is the same for
    every pixel, so this is two lerps with scalar weights.
    """
    def lerp(a, axis: int, d: float):
        # output pixel j (margin-free index) samples padded position j + 1 + d
        base = 1 + math.floor(d)
        f = d - math.floor(d)
        n = a.shape[axis] - 2
        sl = [slice(None)] * 3
        sl[axis] = slice(base, base + n)
        lo = a[tuple(sl)]
        if f == 0.0:
            return lo
        sl[axis] = slice(base + 1, base + 1 + n)
        return lo * (1.0 - f) + a[tuple(sl)] * f

    x = padded.astype(np.float32) if isinstance(padded, np.ndarray) else padded.float()
    return lerp(lerp(x, 1, dx), 0, dy)


def round_u8(a):
    """Round a float image to uint8 (numpy or torch)."""
    if isinstance(a, np.ndarray):
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    import torch

    return torch.clamp(torch.round(a), 0, 255).to(torch.uint8)


def probe_raw_jpeg(path, slide, level: int) -> tuple[RawJpegLevel | None, str]:
    """(level description, "") when the fast path reproduces OpenSlide for ``level``, else (None, reason).

    Checks the vendor, finds the TIFF page with the level's size, requires 8-bit 3-sample tiled
    JPEG in RGB or YCbCr with every tile present, then decodes the first tile and compares it with
    OpenSlide's read of the same pixels.
    """
    import tifffile

    vendor = slide.properties.get("openslide.vendor", "")
    if vendor not in VENDORS:
        return None, f"vendor '{vendor or 'image'}' is not a plain tiled TIFF"
    W, H = slide.level_dimensions[level]
    try:
        with tifffile.TiffFile(path) as tf:
            same = [p for p in tf.pages if (p.imagewidth, p.imagelength) == (W, H)]
            pages = [p for p in same if p.is_tiled and p.tiledepth == 1]   # an Aperio thumbnail is stripped
            if not pages:
                return None, "level is not tiled" if same else f"no TIFF page has the size of level {level}"
            if len(pages) != 1:
                return None, f"{len(pages)} tiled TIFF pages have the size of level {level}"
            p = pages[0]
            if p.compression != _JPEG:
                return None, f"level compression is {tifffile.COMPRESSION(p.compression).name}, not JPEG"
            if p.photometric not in (_RGB, _YCBCR):
                return None, f"photometric {p.photometric} is neither RGB nor YCbCr"
            if p.samplesperpixel != 3 or p.bitspersample != 8 or p.planarconfig != 1:
                return None, "not 8-bit interleaved RGB"
            if p.photometric == _YCBCR and tuple(getattr(p, "subsampling", None) or (2, 2)) not in ((1, 1), (2, 1), (2, 2)):
                return None, f"YCbCr subsampling {p.subsampling} is not supported"
            lv = _level_from_page(path, p)
            n = lv.tiles_across * -(-H // lv.tile_h)
            if len(lv.offsets) != n or min(lv.counts) == 0:
                return None, "some tiles are missing (sparse level)"
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        return None, f"TIFF structure not readable by tifffile ({type(exc).__name__})"
    err = verify_first_tile(lv, slide, level)
    if err is not None:
        return None, err
    return lv, ""


def _level_from_page(path, p) -> RawJpegLevel:
    return RawJpegLevel(str(path), p.index, p.imagewidth, p.imagelength, p.tilewidth, p.tilelength,
                        tuple(int(v) for v in p.dataoffsets), tuple(int(v) for v in p.databytecounts),
                        bytes(p.jpegtables) if p.jpegtables else None,
                        "RGB" if p.photometric == _RGB else "YCBCR")


def load_level(path, page: int) -> RawJpegLevel:
    """The ``RawJpegLevel`` of TIFF page ``page`` (a worker reloads what the planner verified)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return _level_from_page(path, tf.pages[page])


def verify_first_tile(lv: RawJpegLevel, slide, level: int) -> str | None:
    """None when our decode of tile 0 equals OpenSlide's read of those pixels (within tolerance)."""
    from wsi_ncmi.slides.open import rgba_to_rgb

    w, h = min(lv.tile_w, lv.width), min(lv.tile_h, lv.height)
    reader = RawJpegReader(lv, cache_bytes=0)
    try:
        ours = reader.region(0, 0, w, h)
    except Exception as exc:  # a decode error: let OpenSlide read (or report) the slide
        return f"tile 0 does not decode ({type(exc).__name__}: {exc})"
    finally:
        reader.close()
    try:
        theirs = rgba_to_rgb(slide.read_region((0, 0), level, (w, h)))
    except Exception as exc:  # OpenSlide cannot read it either: its error is reported by the read
        return f"OpenSlide cannot read tile 0 ({type(exc).__name__})"
    diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
    if diff > VERIFY_TOLERANCE:
        return f"tile 0 decodes differently from OpenSlide (max difference {diff})"
    return None
