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
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.slides.open import open_slide, rgba_to_rgb
from wsi_ncmi.slides.tiff_writer import write_pyramidal_tiff
from wsi_ncmi.tasks.camelyon17 import CLASSES, pn_stage

ITC_MAX_UM, MICRO_MAX_UM = 200.0, 2000.0
DIAMETERS_UM = {1: (160.0, 190.0), 2: (400.0, 1200.0), 3: (2050.0, 2300.0)}   # per class, inside each band
#: node labels of a patient, one pattern per pN stage: pN0(i+), pN1mi, pN1 (3 nodes with metastases,
#: 2 macro), pN2 (4 nodes, 3 macro); four patients hold five nodes of each class
PATIENT_PATTERNS = ((0, 0, 0, 1, 1), (0, 1, 2, 2, 2), (0, 1, 2, 3, 3), (1, 2, 3, 3, 3))
ITC_FOCI = (4, 6)   # clusters per ITC node (CAMELYON counts every cluster < 0.2 mm as ITC)
DESIGN = 3   # bump when the slides of a plan change (drawing, sizes, lesions): old demo folders are refused
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
    width_um: float = 0.0
    height_um: float = 0.0


def _texture_source(mpp: float) -> np.ndarray:
    from wsi_ncmi.demo.assets import cmu_region

    s = open_slide(cmu_region())
    img = rgba_to_rgb(s.read_region((0, 0), 0, s.dimensions))
    src_mpp = float(s.properties.get("openslide.mpp-x", 0.499))
    s.close()
    f = src_mpp / mpp
    return cv2.resize(img, (int(img.shape[1] * f), int(img.shape[0] * f)), interpolation=cv2.INTER_AREA)


def _tissue_crops(tex: np.ndarray, size: int, min_fraction: float = 0.8) -> list[np.ndarray]:
    from wsi_ncmi.slides.tissue import TissueParams, detect_tissue

    out = []
    step = size // 2
    for y in range(0, tex.shape[0] - size + 1, step):
        for x in range(0, tex.shape[1] - size + 1, step):
            c = tex[y:y + size, x:x + size]
            m, _ = detect_tissue(c, 1.0, TissueParams(min_region_um2=0, max_hole_um2=0))
            if m.mean() > min_fraction:
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


def _blob_mask(h: int, w: int, rng, step: int = 8) -> np.ndarray:
    """An irregular tissue outline: an ellipse with a wobbly edge, 85-90% of the slide.

    The edge function is smooth, so it is evaluated on a grid ``step`` px apart and interpolated:
    the same outline at a sixtieth of the cost of a full-resolution grid.
    """
    hs, ws = h // step + 2, w // step + 2
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32) * step
    cx, cy = w / 2, h / 2
    ang = np.arctan2(yy - cy, xx - cx)
    wob = 1 + sum(0.04 * np.sin(k * ang + rng.uniform(0, 6.3)) for k in (3, 5, 7))
    r = np.sqrt(((xx - cx) / (0.46 * w)) ** 2 + ((yy - cy) / (0.44 * h)) ** 2)
    edge = cv2.resize((r - wob).astype(np.float32), (ws * step, hs * step), interpolation=cv2.INTER_LINEAR)
    return edge[:h, :w] < 0


def build_slide(path: Path, slide: DemoSlide, crops: list[np.ndarray], tumour_crops: list[np.ndarray],
                width_um: float, height_um: float, mpp: float, rng) -> Path:
    w, h = int(width_um / mpp), int(height_um / mpp)
    tissue = _blob_mask(h, w, rng)
    img = _tile_canvas(crops, h, w, rng)
    for les in slide.lesions:   # each disc is filled from a tumour canvas of its own bounding box
        cx, cy, r = les["x_um"] / mpp, les["y_um"] / mpp, les["diameter_um"] / 2 / mpp
        x0, y0 = max(0, int(cx - r) - 1), max(0, int(cy - r) - 1)
        x1, y1 = min(w, int(np.ceil(cx + r)) + 2), min(h, int(np.ceil(cy + r)) + 2)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        box = img[y0:y1, x0:x1]
        box[disc] = _tile_canvas(tumour_crops, y1 - y0, x1 - x0, rng)[disc]
    tint = np.array(TINTS[slide.centre % len(TINTS)], np.float32)   # stain differs by centre; glass does not
    lut = np.clip(np.arange(256, dtype=np.float32)[:, None] * tint[None], 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut.reshape(256, 1, 3))
    glass = np.full((h, w), 240, np.uint8) + rng.integers(0, 6, (h, w), dtype=np.uint8)
    img = np.where(tissue[..., None], img, glass[..., None])
    return write_pyramidal_tiff(path, img, mpp, quality=88)


def per_centre(patients_per_centre: int | list[int] | tuple[int, ...], centres: int) -> list[int]:
    """Patients in each centre: one count for all, or one per centre; 1-20 each, since a patient's
    centre is its number // 20 (the CAMELYON-17 rule)."""
    counts = [patients_per_centre] * centres if isinstance(patients_per_centre, int) else \
        [int(n) for n in patients_per_centre]
    if len(counts) != centres or not all(1 <= n <= 20 for n in counts):
        raise WsiNcmiError(f"--patients-per-centre {','.join(map(str, counts))}: give one count or {centres} "
                           "(one per centre), each 1-20 (a patient's centre is its number // 20)")
    return counts


def plan_cohort(patients_per_centre: int | list[int] | tuple[int, ...] = 2, nodes: int = 5, width_um: float = 5600,
                height_um: float = 4200, seed: int = 0, centres: int = 5) -> list[DemoSlide]:
    """Who has which lesions.

    With five nodes a patient follows one of ``PATIENT_PATTERNS`` (cycled, node order shuffled), so
    patients span four pN stages and every four patients hold five nodes of each class. With fewer
    nodes (the tests' small cohorts) the labels simply cycle, so every centre sees every class.
    """
    rng = np.random.default_rng(seed)
    slides = []
    k = 0
    for centre, n_patients in enumerate(per_centre(patients_per_centre, centres)):
        for p in range(n_patients):
            pid = centre * 20 + p
            if nodes == 5:
                labels = [int(v) for v in rng.permutation(PATIENT_PATTERNS[(p + centre) % len(PATIENT_PATTERNS)])]
            else:
                labels = [(k + i + centre) % 4 for i in range(nodes)]
                k += nodes
            for node, label in enumerate(labels):
                lesions = []
                if label:
                    lesions.append(_place(float(rng.uniform(*DIAMETERS_UM[label])), width_um, height_um, rng))
                    # ITC nodes hold ITC_FOCI clusters; larger lesions sometimes a smaller satellite
                    extra = int(rng.integers(ITC_FOCI[0], ITC_FOCI[1] + 1)) - 1 if label == 1 else int(rng.random() < 0.5)
                    for _ in range(extra):
                        _add_apart(lesions, float(rng.uniform(*DIAMETERS_UM[1])), width_um, height_um, rng)
                slides.append(DemoSlide(f"patient_{pid:03d}_node_{node}", pid, centre, label, lesions,
                                        width_um=width_um, height_um=height_um))
    return slides


def _add_apart(lesions: list[dict], d: float, width_um: float, height_um: float, rng, gap_um: float = 150) -> None:
    """Add a lesion of diameter ``d`` at least ``gap_um`` from every other one (CAMELYON measures
    each cluster on its own, so clusters must not touch); skipped after 50 failed draws."""
    for _ in range(50):
        new = _place(d, width_um, height_um, rng)
        if all(np.hypot(new["x_um"] - o["x_um"], new["y_um"] - o["y_um"]) > (d + o["diameter_um"]) / 2 + gap_um
               for o in lesions):
            lesions.append(new)
            return


def _place(d: float, width_um: float, height_um: float, rng) -> dict:
    # centre within the inner tissue ellipse so the whole disc lies on tissue
    ax, ay = 0.40 * width_um - d / 2, 0.38 * height_um - d / 2
    t, rr = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
    return {"x_um": width_um / 2 + max(ax, 0) * rr * np.cos(t), "y_um": height_um / 2 + max(ay, 0) * rr * np.sin(t),
            "diameter_um": d}


_SHARED = None   # (crops, tumour crops, width_um, height_um, mpp, seed) while a cohort is built


def _build_one(s: DemoSlide) -> None:
    crops, tumour_crops, width_um, height_um, mpp, seed = _SHARED
    rng = np.random.default_rng([seed, s.patient, int(s.slide_id.rsplit("_", 1)[1])])
    part = Path(s.path).with_name(f".{Path(s.path).name}.part")
    build_slide(part, s, crops, tumour_crops, width_um, height_um, mpp, rng)
    part.replace(s.path)


def build_cohort(out: str | Path, patients_per_centre: int | list[int] | tuple[int, ...] = 2, nodes: int = 5, mpp: float = 1.0,
                 width_um: float = 5600, height_um: float = 4200, seed: int = 0, progress: bool = True,
                 centres: int = 5, workers: int = 0) -> Path:
    """Write ``slides/*.tif``, ``stage_labels.csv`` and ``lesions.json`` into ``out``; skip existing slides.

    ``workers``: slide-building processes (0: one per core, at most 4; one where ``fork`` is not
    available). ``cohort.json`` records the design version and these arguments before any slide is
    written; a folder holding slides of another record (other sizes or counts, an older design, or
    no record: an older wsi-ncmi) is refused, since its slides, features and runs would not match
    the new lesions. An interrupted build resumes.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    sdir = out / "slides"
    plan = plan_cohort(patients_per_centre, nodes, width_um, height_um, seed, centres)   # validates first
    sdir.mkdir(parents=True, exist_ok=True)
    for s in plan:
        s.path = str(sdir / f"{s.slide_id}.tif")
    record = out / "cohort.json"
    want = {"design": DESIGN, "patients_per_centre": per_centre(patients_per_centre, centres), "nodes": nodes,
            "width_um": float(width_um), "height_um": float(height_um), "mpp": float(mpp), "seed": seed}
    have = json.loads(record.read_text()) if record.is_file() else None
    if have != want and (have is not None or any(sdir.glob("*.tif"))):
        raise WsiNcmiError(f"{out}: holds a demo cohort of another plan (other settings or an older wsi-ncmi); "
                           "pass a new --out, or delete the folder to rebuild it")
    record.write_text(json.dumps(want, indent=1))
    todo = [s for s in plan if not (sdir / f"{s.slide_id}.tif").exists()]
    if todo:
        global _SHARED
        tex = _texture_source(mpp)
        crops = _tissue_crops(tex, 256)
        # tumour from the densest crops only: a metastasis is solid, and an ITC cut from a crop with
        # a pale gap would be smaller than its recorded diameter
        dense = _tissue_crops(tex, 256, 0.95) or crops
        _SHARED = (crops, [_tumour(c) for c in dense], width_um, height_um, mpp, seed)
        workers = min(len(todo), workers or min(4, os.cpu_count() or 1))
        bar = tqdm(total=len(todo), desc="demo slides", unit="slide", disable=None if progress else True)
        try:
            if workers <= 1 or "fork" not in mp.get_all_start_methods():
                for s in todo:
                    _build_one(s)
                    bar.update()
            else:   # fork: the workers inherit the texture crops instead of receiving them pickled
                with mp.get_context("fork").Pool(workers) as pool:
                    for _ in pool.imap_unordered(_build_one, todo):
                        bar.update()
        finally:
            bar.close()
            _SHARED = None
    lines = ["patient,stage"]
    for pid in sorted({s.patient for s in plan}):
        nodes_ = [s for s in plan if s.patient == pid]
        lines.append(f"patient_{pid:03d}.zip,{pn_stage([s.label for s in nodes_]) if len(nodes_) == 5 else ''}")
        lines += [f"{s.slide_id}.tif,{CLASSES[s.label]}" for s in nodes_]
    (out / "stage_labels.csv").write_text("\n".join(lines) + "\n")
    (out / "lesions.json").write_text(json.dumps([asdict(s) for s in plan], indent=1))
    return out
