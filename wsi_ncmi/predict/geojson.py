"""Per-patch values as GeoJSON that QuPath imports as detections with measurements.

Why GeoJSON: pathologists review a model's map next to the tissue in QuPath, where a
FeatureCollection of ``objectType: detection`` Features with a ``measurements`` dict becomes one
detection per patch, colourable by any measurement (Measure > Show measurement maps).
Coordinates are level-0 pixels, the frame QuPath uses for the whole-slide image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _num(v: float) -> float | None:
    v = float(v)
    return round(v, 9) if math.isfinite(v) else None


def patches_geojson(coords: np.ndarray, extent: tuple[float, float], measurements: dict[str, np.ndarray],
                    slide_id: str = "") -> dict:
    """One Polygon Feature per patch (its level-0 square) carrying its values as measurements."""
    ex, ey = float(extent[0]), float(extent[1])
    names = list(measurements)
    cols = [np.asarray(measurements[k], np.float64).reshape(-1) for k in names]
    feats = []
    for i, (x, y) in enumerate(np.asarray(coords, np.float64).reshape(-1, 2)):
        x1, y1 = x + ex, y + ey
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]
        feats.append({"type": "Feature", "id": f"{slide_id}:{i}" if slide_id else str(i),
                      "geometry": {"type": "Polygon", "coordinates": [[[round(a, 3), round(b, 3)] for a, b in ring]]},
                      "properties": {"objectType": "detection",
                                     "measurements": {k: _num(c[i]) for k, c in zip(names, cols)}}})
    return {"type": "FeatureCollection", "features": feats}


def write_patches_geojson(path: str | Path, coords: np.ndarray, extent: tuple[float, float],
                          measurements: dict[str, np.ndarray], slide_id: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(patches_geojson(coords, extent, measurements, slide_id)))
    return path
