"""Tissue masks as GeoJSON polygons in level-0 pixels: the export QuPath opens, and its re-import.

Both directions live here so that a mask written by extraction and read back (unedited) gives the
same pixels: the export traces the mask's contours through pixel *centres*
(``(i + 0.5) * scale``), and the import fills polygons on the same grid with boundary pixels
included and a hole's own boundary pixels kept (OpenCV's contours run along the tissue pixels on
both sides of a hole). ``tests/test_tissue_masks.py`` checks that round trip on a real slide.

Accepted input (what QuPath and other tools write): a ``FeatureCollection``, a single ``Feature``,
a bare geometry, or a JSON list of features/geometries; ``Polygon`` and ``MultiPolygon`` define
tissue (holes honoured, overlapping polygons unite); points and lines carry no area and are
ignored. Coordinates are level-0 pixels of the whole image, x to the right, y down (QuPath's).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from wsi_ncmi.errors import WsiNcmiError

#: fractional bits of the vertices passed to OpenCV's fill (1/16 mask px)
_SHIFT = 4
_FAR = 1e7
_AREAL = ("Polygon", "MultiPolygon")
_NO_AREA = ("Point", "MultiPoint", "LineString", "MultiLineString")

FIX = ("export it again (QuPath: File > Export objects as GeoJSON) as polygons in level-0 pixel "
       "coordinates, or remove the file to use tissue detection for this slide")


class GeoJSONError(WsiNcmiError):
    """A tissue GeoJSON that cannot be used; the message names the file, what is wrong and the fix."""


def geojson_for(folder: str | Path | None, slide_id: str) -> Path | None:
    """``<folder>/<slide_id>.geojson`` when it exists, else None (tissue detection)."""
    if not folder:
        return None
    p = Path(folder) / f"{slide_id}.geojson"
    return p if p.is_file() else None


def require_geojson_dir(folder: str | Path | None) -> None:
    """``--tissue-geojson DIR`` (extract, info) must name a folder; None (not given) passes."""
    if folder and not Path(folder).is_dir():
        raise WsiNcmiError(f"--tissue-geojson {folder}: no such folder; pass the folder that holds "
                           "<slide_id>.geojson files (e.g. edited exports from <out>/tissue)")


# ---- export ----------------------------------------------------------------------------------
def mask_to_geojson(mask: np.ndarray, scale_x: float, scale_y: float, slide_id: str) -> dict:
    """Outlines of a boolean mask (1 px = ``scale`` level-0 px) as a QuPath-importable
    FeatureCollection of "Tissue" annotations: one Polygon (outer ring + holes) per region."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features = []
    if hierarchy is None:
        return {"type": "FeatureCollection", "features": features}
    hier = hierarchy[0]

    def ring(c):
        pts = [[round((float(p[0][0]) + 0.5) * scale_x, 1), round((float(p[0][1]) + 0.5) * scale_y, 1)] for p in c]
        return pts + [pts[0]]

    def drawable(c) -> bool:   # what the reader accepts: 3 distinct points (lone pixels, lines are not)
        return len(np.unique(c.reshape(-1, 2), axis=0)) >= 3

    for i, c in enumerate(contours):
        if hier[i][3] != -1 or not drawable(c):
            continue
        rings = [ring(c)]
        child = hier[i][2]
        while child != -1:
            if drawable(contours[child]):
                rings.append(ring(contours[child]))
            child = hier[child][0]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}, "slide_id": slide_id},
        })
    return {"type": "FeatureCollection", "features": features}


# ---- import ----------------------------------------------------------------------------------
def read_tissue_geojson(path: str | Path) -> tuple[list[list[np.ndarray]], str]:
    """Polygons of a tissue GeoJSON file and the sha256 of its bytes (the mask's provenance).

    Each polygon is a list of rings (float arrays (n, 2), level-0 px): the outer ring, then holes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GeoJSONError(f"{path}: cannot read ({exc.strerror or exc}); fix its permissions or remove "
                           "it to use tissue detection for this slide") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GeoJSONError(f"{path}: not valid JSON ({exc}); {FIX}") from None
    polygons: list[list[np.ndarray]] = []
    areal_or_empty = _collect(obj, polygons, path, "the file")
    if not polygons and not areal_or_empty:
        raise GeoJSONError(f"{path}: no Polygon or MultiPolygon (only points or lines, which have no area); {FIX}")
    return polygons, digest


def reads_back_exactly(obj: dict, mask: np.ndarray, scale_x: float, scale_y: float) -> bool:
    """Whether ``obj`` (an export of ``mask``) rasterises back to ``mask`` pixel for pixel.

    True for detected masks; False when the mask holds pieces thinner than the contour needs
    (a lone pixel or a one-pixel line, which the export cannot draw as a polygon).
    """
    polygons: list[list[np.ndarray]] = []
    _collect(obj, polygons, Path("<export>"), "the export")
    return np.array_equal(rasterize_polygons(polygons, mask.shape, scale_x, scale_y), mask.astype(bool))


def _collect(obj, out: list, path: Path, where: str) -> bool:
    """Append the polygons in ``obj`` to ``out``; False when ``obj`` only held area-less geometry."""
    if isinstance(obj, list):
        found = [_collect(o, out, path, f"item {i}") for i, o in enumerate(obj)]
        return not obj or any(found)
    if not isinstance(obj, dict) or "type" not in obj:
        raise GeoJSONError(f"{path}: {where} is not a GeoJSON object (no \"type\"); {FIX}")
    kind = obj["type"]
    if kind == "FeatureCollection":
        feats = obj.get("features")
        if not isinstance(feats, list):
            raise GeoJSONError(f"{path}: FeatureCollection without a \"features\" list; {FIX}")
        found = [_collect(f, out, path, f"feature {i}") for i, f in enumerate(feats)]
        return not feats or any(found)
    if kind == "Feature":
        geom = obj.get("geometry")
        return True if geom is None else _collect(geom, out, path, where)
    if kind == "GeometryCollection":
        geoms = obj.get("geometries")
        if not isinstance(geoms, list):
            raise GeoJSONError(f"{path}: {where}: GeometryCollection without a \"geometries\" list; {FIX}")
        found = [_collect(g, out, path, where) for g in geoms]
        return not geoms or any(found)
    if kind in _NO_AREA:
        return False
    if kind not in _AREAL:
        raise GeoJSONError(f"{path}: {where} has unknown GeoJSON type {kind!r}; {FIX}")
    coords = obj.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords
    if not isinstance(polys, list):
        raise GeoJSONError(f"{path}: {where}: {kind} without a \"coordinates\" list; {FIX}")
    for poly in polys:
        out.append(_rings(poly, path, where, kind))
    return True


def _rings(poly, path: Path, where: str, kind: str) -> list[np.ndarray]:
    if not isinstance(poly, list) or not poly:
        raise GeoJSONError(f"{path}: {where}: a {kind} needs a list of rings ([[x, y], ...]); {FIX}")
    rings = []
    for ring in poly:
        try:
            arr = np.asarray([p[:2] for p in ring], dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            arr = None
        if arr is None or arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
            raise GeoJSONError(f"{path}: {where}: a {kind} ring is not a list of [x, y] numbers; {FIX}")
        if len(np.unique(arr, axis=0)) < 3:
            raise GeoJSONError(f"{path}: {where}: a {kind} ring has fewer than 3 distinct points; {FIX}")
        rings.append(arr)
    return rings


def rasterize_polygons(polygons: list[list[np.ndarray]], shape: tuple[int, int], scale_x: float,
                       scale_y: float) -> np.ndarray:
    """Boolean mask of ``shape`` (1 px = ``scale`` level-0 px) covered by the polygons.

    A mask pixel is in when its centre is inside or on an outer ring and not strictly inside a
    hole; each polygon is drawn in its own bounding box so thousands of small ones stay cheap.
    """
    h, w = shape
    out = np.zeros((h, w), np.uint8)
    for rings in polygons:
        # vertices absurdly far outside (1e7 mask px) are pulled in so OpenCV's int32 cannot overflow
        pts = [np.round(np.clip(r / (scale_x, scale_y) - 0.5, -_FAR, _FAR) * (1 << _SHIFT)).astype(np.int64)
               for r in rings]
        lo = pts[0].min(axis=0) >> _SHIFT
        hi = (pts[0].max(axis=0) >> _SHIFT) + 2
        x0, y0 = max(0, int(lo[0])), max(0, int(lo[1]))
        x1, y1 = min(w, int(hi[0])), min(h, int(hi[1]))
        if x1 <= x0 or y1 <= y0:
            continue   # entirely outside the slide
        off = np.array([x0, y0], np.int64) << _SHIFT
        local = [(p - off).astype(np.int32).reshape(-1, 1, 2) for p in pts]
        box = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(box, [local[0]], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        for hole in local[1:]:
            inside = np.zeros_like(box)
            cv2.fillPoly(inside, [hole], 1, lineType=cv2.LINE_8, shift=_SHIFT)
            cv2.polylines(inside, [hole], True, 0, thickness=1, lineType=cv2.LINE_8, shift=_SHIFT)
            box[inside.astype(bool)] = 0
        out[y0:y1, x0:x1] |= box
    return out.astype(bool)


def polygons_bounds(polygons: list[list[np.ndarray]]) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of the outer rings, level-0 px (for the 'outside the slide' error)."""
    allp = np.concatenate([p[0] for p in polygons])
    return float(allp[:, 0].min()), float(allp[:, 1].min()), float(allp[:, 0].max()), float(allp[:, 1].max())
