"""A small CAMELYON-17-like cohort of real pyramidal TIFF slides, built from real H&E.

Tissue is the CC0 CMU-1 region (``assets.cmu_region``), resampled to the slide's mpp and re-tiled
with random flips and rotations inside an irregular tissue outline. Lesions are discs of the same
H&E with a tumour appearance (cells enlarged 1.6x, hyperchromatic: darker and bluer), implanted at
controlled diameters so that each node's label follows the CAMELYON rule on the largest lesion:
none -> negative, < 0.2 mm -> ITC, 0.2-2 mm -> micro, > 2 mm -> macro. Patients are spread over five
"centres" (centre = patient // 20, as in the challenge), each with its own stain tint, and the
labels are written as the challenge's ``stage_labels.csv``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wsi_ncmi.slides.open import open_slide, rgba_to_rgb
from wsi_ncmi.slides.tiff_writer import write_pyramidal_tiff
from wsi_ncmi.tasks.camelyon17 import CLASSES, pn_stage

ITC_MAX_UM, MICRO_MAX_UM = 200.0, 2000.0
DIAMETERS_UM = {1: (90.0, 170.0), 2: (450.0, 1500.0), 3: (2200.0, 2700.0)}   # per class, well inside each band
TINTS = [(1.00, 1.00, 1.00), (1.04, 0.94, 1.00), (0.95, 0.99, 1.05), (1.05, 1.00, 0.92), (0.96, 0.92, 1.04)]


def label_from_diameters(diameters_um: list[float]) -> int:
    """CAMELYON slide label from the largest lesion diameter (0 negative, 1 ITC, 2 micro, 3 macro)."""
    d = max(diameters_um, default=0.0)
    if d <= 0:
        return 0
    return 1 if d < ITC_MAX_UM else 2 if d <= MICRO_MAX_UM else 3


@dataclass
class DemoSlide:
    slide_id: str
    patient: int
    centre: int
    label: int
    lesions: list[dict] = field(default_factory=list)   # {"x_um", "y_um", "diameter_um"}
    path: str = ""


def _texture_source(mpp: float) -> np.ndarray:
    from wsi_ncmi.demo.assets import cmu_region

    s = open_slide(cmu_region())
    img = rgba_to_rgb(s.read_region((0, 0), 0, s.dimensions))
    src_mpp = float(s.properties.get("openslide.mpp-x", 0.499))
    s.close()
    f = src_mpp / mpp
    return cv2.resize(img, (int(img.shape[1] * f), int(img.shape[0] * f)), interpolation=cv2.INTER_AREA)


def _tissue_crops(tex: np.ndarray, size: int) -> list[np.ndarray]:
    from wsi_ncmi.slides.tissue import TissueParams, detect_tissue

    out = []
    step = size // 2
    for y in range(0, tex.shape[0] - size + 1, step):
        for x in range(0, tex.shape[1] - size + 1, step):
            c = tex[y:y + size, x:x + size]
            m, _ = detect_tissue(c, 1.0, TissueParams(min_region_um2=0, max_hole_um2=0))
            if m.mean() > 0.8:
                out.append(np.ascontiguousarray(c))
    return out


def _tile_canvas(crops: list[np.ndarray], h: int, w: int, rng) -> np.ndarray:
    size = crops[0].shape[0]
    canvas = np.empty((h + size, w + size, 3), np.uint8)
    for y in range(0, h, size):
        for x in range(0, w, size):
            c = crops[int(rng.integers(len(crops)))]
            c = np.rot90(c, int(rng.integers(4)))
            if rng.random() < 0.5:
                c = c[:, ::-1]
            canvas[y:y + size, x:x + size] = c
    return canvas[:h, :w]


def _tumour(img: np.ndarray) -> np.ndarray:
    big = cv2.resize(img, None, fx=1.6, fy=1.6, interpolation=cv2.INTER_CUBIC)[: img.shape[0], : img.shape[1]]
    t = big.astype(np.float32)
    t = 255 - (255 - t) * np.array([1.45, 1.55, 1.05], np.float32)   # hyperchromatic: darker, bluer
    return np.clip(t, 0, 255).astype(np.uint8)


def _blob_mask(h: int, w: int, rng) -> np.ndarray:
    """An irregular tissue outline: an ellipse with a wobbly edge, 85-90% of the slide."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2, h / 2
    ang = np.arctan2(yy - cy, xx - cx)
    wob = 1 + sum(0.04 * np.sin(k * ang + rng.uniform(0, 6.3)) for k in (3, 5, 7))
    r = np.sqrt(((xx - cx) / (0.46 * w)) ** 2 + ((yy - cy) / (0.44 * h)) ** 2)
    return r < wob


def build_slide(path: Path, slide: DemoSlide, crops: list[np.ndarray], tumour_crops: list[np.ndarray],
                width_um: float, height_um: float, mpp: float, rng) -> Path:
    w, h = int(width_um / mpp), int(height_um / mpp)
    tissue = _blob_mask(h, w, rng)
    img = np.where(tissue[..., None], _tile_canvas(crops, h, w, rng), np.uint8(240))
    img = img + rng.integers(0, 6, (h, w, 1), dtype=np.uint8) * (~tissue[..., None])
    if slide.lesions:
        tum = _tile_canvas(tumour_crops, h, w, rng)
        yy, xx = np.ogrid[0:h, 0:w]
        for les in slide.lesions:
            cx, cy, r = les["x_um"] / mpp, les["y_um"] / mpp, les["diameter_um"] / 2 / mpp
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            img[disc] = tum[disc]
    tint = np.array(TINTS[slide.centre % len(TINTS)], np.float32)   # stain differs by centre; glass does not
    img[tissue] = np.clip(img[tissue].astype(np.float32) * tint, 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(path, img, mpp, quality=88)


def plan_cohort(patients_per_centre: int = 2, nodes: int = 5, width_um: float = 5600, height_um: float = 4200,
                seed: int = 0, centres: int = 5) -> list[DemoSlide]:
    """Who has which lesions; labels cycle so every centre sees every class."""
    rng = np.random.default_rng(seed)
    slides = []
    k = 0
    for centre in range(centres):
        for p in range(patients_per_centre):
            pid = centre * 20 + p
            for node in range(nodes):
                label = (k + centre) % 4
                k += 1
                lesions = []
                if label:
                    lo, hi = DIAMETERS_UM[label]
                    d = float(rng.uniform(lo, hi))
                    lesions.append(_place(d, width_um, height_um, rng))
                    if label >= 2 and rng.random() < 0.5:   # sometimes a smaller satellite, apart from it
                        d2 = float(rng.uniform(*DIAMETERS_UM[1]))
                        for _ in range(50):
                            sat = _place(d2, width_um, height_um, rng)
                            gap = np.hypot(sat["x_um"] - lesions[0]["x_um"], sat["y_um"] - lesions[0]["y_um"])
                            if gap > (d + d2) / 2 + 150:
                                lesions.append(sat)
                                break
                slides.append(DemoSlide(f"patient_{pid:03d}_node_{node}", pid, centre, label, lesions))
    return slides


def _place(d: float, width_um: float, height_um: float, rng) -> dict:
    # centre within the inner tissue ellipse so the whole disc lies on tissue
    ax, ay = 0.40 * width_um - d / 2, 0.38 * height_um - d / 2
    t, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
    return {"x_um": width_um / 2 + max(ax, 0) * rr * np.cos(t), "y_um": height_um / 2 + max(ay, 0) * rr * np.sin(t),
            "diameter_um": d}


def build_cohort(out: str | Path, patients_per_centre: int = 2, nodes: int = 5, mpp: float = 1.0,
                 width_um: float = 5600, height_um: float = 4200, seed: int = 0, progress: bool = True,
                 centres: int = 5) -> Path:
    """Write ``slides/*.tif``, ``stage_labels.csv`` and ``lesions.json`` into ``out``; skip existing slides."""
    from tqdm.auto import tqdm

    out = Path(out)
    sdir = out / "slides"
    sdir.mkdir(parents=True, exist_ok=True)
    plan = plan_cohort(patients_per_centre, nodes, width_um, height_um, seed, centres)
    todo = [s for s in plan if not (sdir / f"{s.slide_id}.tif").exists()]
    if todo:
        tex = _texture_source(mpp)
        crops = _tissue_crops(tex, 256)
        tumour_crops = [_tumour(c) for c in crops]
        for s in tqdm(todo, desc="demo slides", unit="slide", disable=None if progress else True):
            rng = np.random.default_rng([seed, s.patient, int(s.slide_id[-1])])
            part = sdir / f".{s.slide_id}.tif.part"
            build_slide(part, s, crops, tumour_crops, width_um, height_um, mpp, rng)
            part.replace(sdir / f"{s.slide_id}.tif")
    for s in plan:
        s.path = str(sdir / f"{s.slide_id}.tif")
    lines = ["patient,stage"]
    for pid in sorted({s.patient for s in plan}):
        nodes_ = [s for s in plan if s.patient == pid]
        lines.append(f"patient_{pid:03d}.zip,{pn_stage([s.label for s in nodes_]) if len(nodes_) == 5 else ''}")
        lines += [f"{s.slide_id}.tif,{CLASSES[s.label]}" for s in nodes_]
    (out / "stage_labels.csv").write_text("\n".join(lines) + "\n")
    (out / "lesions.json").write_text(json.dumps([asdict(s) for s in plan], indent=1))
    return out
