"""Pen-mark (marker ink) detection on the tissue thumbnail, for ``extract --remove-pen``.

Why a colour rule works: H&E is pink to purple (hue about 250-360 and 0-20 degrees); the markers
pathologists circle lesions with are green, blue or black, colours the stains do not make. Ink is
saturated where H&E never is (green, blue) or dark and grey where tissue is dark but saturated
(black). The same idea as the RGB pen filters of deephistopath/histolab (``GreenPenFilter``,
``BluePenFilter``) and CLAM's black-patch check; this is our own rule, in HSV, with thresholds
measured on real H&E (the CMU-1 crop in the tests: none of its tissue pixels form an ink region)
and on marker colours laid over it (``tests/test_tissue_masks.py``).

The rule, on the thumbnail at the tissue-mask resolution (hue in degrees, S and V in 0-255):

* green ink: 60 <= hue < 190 and S >= 50 and V >= 30 (green over purple tissue turns teal, ~185)
* blue ink:  190 <= hue < 250 and S >= 100 (hematoxylin is bluish purple, hue ~250-290, so the
  band stops at 250 and needs a saturation stains rarely reach there)
* black ink: V < 50, or V < 100 and S < 80 (dark and grey; dense nuclei are dark but saturated)

Ink regions smaller than ``MIN_INK_UM2`` are ignored (single dark or bluish pixels occur in
tissue; a marker stroke is hundreds of microns wide), and the rest is dilated by ``GROW_UM`` to
take the blended rim of each stroke. Red ink is not removed: it is the colour of eosin.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_INK_UM2 = 2000.0   # ink regions smaller than this (about 45 x 45 um) are not pen
GROW_UM = 16.0         # dilate ink by this much to take the stroke's blended rim

RULE = ("green: 60<=hue<190 S>=50 V>=30; blue: 190<=hue<250 S>=100; black: V<50 or (V<100 and S<80); "
        f"regions >= {MIN_INK_UM2:g} um2, grown {GROW_UM:g} um")


def ink_mask(rgb: np.ndarray, mask_mpp: float) -> np.ndarray:
    """Boolean mask of green, blue and black marker ink in an RGB thumbnail at ``mask_mpp`` um/px."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h = hsv[..., 0].astype(np.int16) * 2            # OpenCV stores hue / 2 in 8-bit images
    s = hsv[..., 1].astype(np.int16)
    v = hsv[..., 2].astype(np.int16)
    green = (h >= 60) & (h < 190) & (s >= 50) & (v >= 30)
    blue = (h >= 190) & (h < 250) & (s >= 100)
    black = (v < 50) | ((v < 100) & (s < 80))
    ink = (green | blue | black).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] * mask_mpp * mask_mpp >= MIN_INK_UM2
    keep[0] = False
    ink = keep[labels].astype(np.uint8)
    r = int(round(GROW_UM / mask_mpp))
    if r > 0 and ink.any():
        ink = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return ink.astype(bool)
