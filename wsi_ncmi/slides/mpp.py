"""Level-0 microns-per-pixel, and where it came from.

Patches must cover an exact physical size, so every slide needs a trusted mpp. Sources, in order:

1. a per-slide CSV (``slide_id,mpp``) given with ``--mpp-csv``: the user's explicit per-slide
   statement, so it also corrects slides whose metadata is wrong;
2. slide metadata: ``openslide.mpp-x/y`` (OpenSlide's reading of Aperio, Hamamatsu, MIRAX,
   DICOM, generic TIFF in centimetres...), else TIFF resolution tags in inches, else
   ``aperio.MPP``;
3. ``--slide-mpp``, a default for slides that carry none.

Values outside a plausible range (0.05-20 um/px) are rejected: a TIFF written with the 72-dpi
default says 352.8 um/px, and using it would silently produce patches 700x too large. Magnification
(``objective-power``) is never turned into an mpp: 20x means 0.5 um/px on one scanner and 0.46 on
another.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from wsi_ncmi.errors import SlideError, WsiNcmiError

MPP_RANGE = (0.05, 20.0)
_FIX = "pass --slide-mpp MPP, or list the slide in --mpp-csv (columns slide_id,mpp)"


@dataclass(frozen=True)
class Mpp:
    """Level-0 microns per pixel along x and y, and the source it was read from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


def _plausible(v: float) -> bool:
    return math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1]


def metadata_mpp(props) -> tuple[float, float, str] | None:
    """(mpp_x, mpp_y, key) from slide properties, or None. Not range-checked."""
    try:
        return float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]), "openslide.mpp-x"
    except (KeyError, ValueError):
        pass
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    factor = {"inch": 25400.0, "centimeter": 10000.0}.get(unit)
    if factor:
        try:
            xr, yr = float(props["tiff.XResolution"]), float(props["tiff.YResolution"])
            if xr > 0 and yr > 0:
                return factor / xr, factor / yr, "tiff.XResolution"
        except (KeyError, ValueError):
            pass
    try:
        v = float(props["aperio.MPP"])
        return v, v, "aperio.MPP"
    except (KeyError, ValueError):
        return None


def _image_mpp(slide) -> tuple[float, float, str] | None:
    """Resolution stored in a plain image (PIL ``dpi``), for ImageSlide ROIs."""
    img = getattr(slide, "_image", None)
    dpi = getattr(img, "info", {}).get("dpi") if img is not None else None
    if dpi and dpi[0] and dpi[1]:
        return 25400.0 / float(dpi[0]), 25400.0 / float(dpi[1]), "image.dpi"
    return None


def resolve_mpp(slide, path: str | Path, slide_id: str, csv_mpp: dict[str, float] | None = None,
                default_mpp: float | None = None) -> Mpp:
    """Find the level-0 mpp of an open slide; raise ``SlideError`` naming the fix if there is none."""
    if csv_mpp and slide_id in csv_mpp:
        v = csv_mpp[slide_id]
        return Mpp(v, v, "csv")
    found = metadata_mpp(slide.properties) or _image_mpp(slide)
    rejected = None
    if found:
        mx, my, key = found
        if _plausible(mx) and _plausible(my):
            if abs(mx - my) / max(mx, my) > 0.05:
                raise SlideError(path, "implausible-mpp",
                                 f"non-square pixels in metadata ({key}: x={mx:.4g}, y={my:.4g} um/px); {_FIX}")
            return Mpp(mx, my, f"metadata:{key}")
        rejected = f"metadata {key} says {mx:.4g} um/px, outside {MPP_RANGE[0]}-{MPP_RANGE[1]}"
    if default_mpp is not None:
        return Mpp(default_mpp, default_mpp, "flag:--slide-mpp")
    if rejected:
        raise SlideError(path, "implausible-mpp", f"{rejected}; {_FIX}")
    raise SlideError(path, "missing-mpp", f"no microns-per-pixel in the slide metadata; {_FIX}")


def check_mpp_value(v: float, what: str) -> float:
    if not _plausible(v):
        raise WsiNcmiError(f"{what}: {v} um/px is outside the plausible range "
                           f"{MPP_RANGE[0]}-{MPP_RANGE[1]}; give microns per pixel (e.g. 0.25 for 40x)")
    return v


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read ``slide_id,mpp`` rows (header required). Errors name the file, line and fix."""
    path = Path(path)
    if not path.is_file():
        raise WsiNcmiError(f"{path}: mpp CSV not found; give a CSV with columns slide_id,mpp")
    out: dict[str, float] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "slide_id" not in cols or "mpp" not in cols:
            raise WsiNcmiError(f"{path}: needs a header with columns slide_id,mpp (found {','.join(cols) or 'none'})")
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                v = float(row["mpp"])
            except ValueError:
                raise WsiNcmiError(f"{path}:{lineno}: mpp '{row['mpp']}' is not a number") from None
            out[row["slide_id"]] = check_mpp_value(v, f"{path}:{lineno}")
    return out
