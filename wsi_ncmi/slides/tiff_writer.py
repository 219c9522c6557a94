"""Writing pyramidal JPEG-tiled TIFF slides that OpenSlide opens as ``generic-tiff``.

Used by the demo cohort, the tests and the benchmarks to make real slide files with known
content and a known mpp. Layout OpenSlide expects: one top-level tiled page per level (not
SubIFDs), each level half the previous one, resolution tags in centimetres (OpenSlide turns them
into ``openslide.mpp-x``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import tifffile


def _levels(image: np.ndarray, min_size: int) -> list[np.ndarray]:
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: float | None, tile: int = 256,
                         quality: int = 90, min_level_size: int = 512, compression: str = "jpeg") -> Path:
    """Write an RGB uint8 image as a tiled pyramidal TIFF; ``mpp=None`` writes no resolution tags."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comp = ("jpeg", {"level": quality}) if compression == "jpeg" else (compression, None)
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, lvl in enumerate(_levels(image, min_level_size)):
            kw = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * (2 ** i))
                kw = dict(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            tif.write(lvl, tile=(tile, tile), photometric="rgb", compression=comp[0],
                      compressionargs=comp[1], subfiletype=0 if i == 0 else 1, metadata=None, **kw)
    return path


def write_tiled_tiff_streaming(path: str | Path, shape: tuple[int, int], mpp: float,
                               tile_fn: Callable[[int, int, int], np.ndarray], tile: int = 256,
                               levels: int = 4, quality: int = 85) -> Path:
    """Write a large pyramidal TIFF tile by tile, never holding a level in memory.

    ``tile_fn(level, ty, tx)`` returns the (tile, tile, 3) uint8 content of tile (ty, tx) of that
    level; used by the throughput benchmark to make multi-GB-equivalent slides.
    """
    path = Path(path)
    h, w = shape
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for lv in range(levels):
            lh, lw = max(1, h >> lv), max(1, w >> lv)
            nty, ntx = -(-lh // tile), -(-lw // tile)

            def tiles(lv=lv, nty=nty, ntx=ntx) -> Iterator[np.ndarray]:
                for ty in range(nty):
                    for tx in range(ntx):
                        yield tile_fn(lv, ty, tx)

            px_per_cm = 1e4 / (mpp * (2 ** lv))
            tif.write(tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg", compressionargs={"level": quality}, subfiletype=0 if lv == 0 else 1,
                      resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", metadata=None)
    return path
