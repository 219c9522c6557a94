"""Thumbnail with the tissue outline (green) and the kept patch grid (blue), as PNG.

The first thing to look at when a cohort's features look wrong: missed tissue, background
patches, pen marks or a wrong mpp (patches the wrong size) are visible at a glance.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MAX_SIDE = 2048
MIN_SIDE = 768   # small slides are drawn larger so the grid stays readable


def save_grid_thumbnail(path: str | Path, tissue, grid) -> Path:
    img = tissue.thumbnail.copy()
    h, w = img.shape[:2]
    scale = min(1.0, MAX_SIDE / max(h, w)) if max(h, w) > MIN_SIDE else MIN_SIDE / max(h, w)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        img = cv2.resize(img, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=interp)
    fx, fy = scale / tissue.scale_x, scale / tissue.scale_y   # level-0 px -> picture px
    for x, y in grid.coords:
        p0 = (int(round(x * fx)), int(round(y * fy)))
        p1 = (int(round((x + grid.extent_x) * fx)) - 1, int(round((y + grid.extent_y) * fy)) - 1)
        cv2.rectangle(img, p0, p1, (40, 90, 220), 1)
    mask = tissue.mask.astype(np.uint8)
    if scale != 1.0:
        mask = cv2.resize(mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (20, 170, 40), 2 if max(img.shape[:2]) > 400 else 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path
