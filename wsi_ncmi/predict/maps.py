"""One slide's heatmap under a run: per-patch attention and information, picture, CSV, GeoJSON.

Why here and not in ``viz``: this loads features and slides and runs the models (through
``predict.members``, i.e. ``train.inference``); ``viz.heatmap`` only draws the arrays it is given.

Values per patch, averaged over the members given (one for ``heatmap --seed``, every member for
``predict --heatmaps``):

* ``attention``: the model's attention in its bag, and its rank within the bag (what is drawn);
* ``information``: infoCAM's contrast i(x; c) - mean_{k != c} i(x; k) for the predicted (or a
  chosen) class c, by the ``instance`` or ``removal`` estimator of ``mil.information``.

With ``overlap`` > 0 the shifted grids of ``predict.shifted`` are embedded and scored as bags of
their own; their patches join the map (and the CSV and GeoJSON).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.predict.members import Member, score_bag

KINDS = ("attention", "info")


@dataclass
class SlideMap:
    slide_id: str
    classes: list[str]
    probs: np.ndarray           # (C,) ensemble mean on the stored grid
    target: int                 # class of the information values
    coords: np.ndarray          # (N, 2) every patch drawn (stored grid first)
    extent: tuple[float, float]
    attention: np.ndarray       # (N,) mean attention over members, within its bag
    rank: np.ndarray            # (N,) attention rank within its bag, 0..1
    information: np.ndarray     # (N,)
    stored: int                 # patches of the stored grid (the first rows)


def _rank(a: np.ndarray) -> np.ndarray:
    return a.argsort().argsort() / max(1, len(a) - 1)


def _information(members: list[Member], x: torch.Tensor, coords: np.ndarray, cls: int, estimator: str,
                 max_evals: int) -> np.ndarray:
    from wsi_ncmi.mil.information import info_contrast, instance_information, removal_information

    vals = []
    for m in members:
        rm = m.model
        if estimator == "instance":
            pmi = instance_information(rm.model, rm.map_log_scores, x, rm.priors, includes_prior=rm.includes_prior)
        else:
            pmi = removal_information(rm.model, rm.map_log_scores, x, coords, max_evals, priors=rm.priors,
                                      includes_prior=rm.includes_prior)[0]
        vals.append(info_contrast(pmi, cls))
    return np.mean(vals, 0)


def slide_map(members: list[Member], features: np.ndarray, coords: np.ndarray, attrs: dict, slide_id: str,
              target: str | None = None, estimator: str = "instance", max_evals: int = 2048,
              shifted: list | None = None) -> SlideMap:
    """Per-patch values of one slide (stored grid, then each shifted bag of ``shifted``)."""
    from wsi_ncmi.mil.information import ESTIMATORS

    if estimator not in ESTIMATORS:
        raise WsiNcmiError(f"--estimator {estimator}: choose one of {', '.join(ESTIMATORS)}")
    classes = members[0].model.classes
    x = torch.from_numpy(np.asarray(features, np.float32))
    first = score_bag(members, x)
    probs = first.mean
    cls = int(np.argmax(probs))
    if target is not None:
        if target not in classes:
            raise WsiNcmiError(f"--target-class {target}: not a class of this run ({', '.join(classes)})")
        cls = classes.index(target)
    ext_x = float(attrs.get("patch_size_level0_x", 0) or 0) or \
        float(coords[1, 0] - coords[0, 0] if len(coords) > 1 else 256)
    ext = (ext_x, float(attrs.get("patch_size_level0_y", 0) or 0) or ext_x)
    bags = [(coords, x, first)] + [(b.coords, torch.from_numpy(b.features), None) for b in (shifted or [])]
    cs, att, rank, info = [], [], [], []
    for c, xb, sc in bags:
        sc = sc or score_bag(members, xb)
        a = sc.attention.mean(0) if sc.attention is not None else np.full(len(c), 1.0 / max(1, len(c)))
        cs.append(np.asarray(c))
        att.append(a)
        rank.append(_rank(a))
        info.append(_information(members, xb, c, cls, estimator, max_evals))
    return SlideMap(slide_id, classes, probs, cls, np.concatenate(cs), ext, np.concatenate(att),
                    np.concatenate(rank), np.concatenate(info), len(coords))


def find_slide_file(slide: str | None, attrs: dict, sid: str, h5: Path) -> Path:
    """The slide a feature file came from: the file given, else the recorded path; checked to match."""
    from wsi_ncmi.slides.match import check_slide_matches

    path = Path(slide) if slide and Path(slide).is_file() else Path(attrs.get("slide_path") or "")
    if not path.is_file():
        raise WsiNcmiError(f"slide '{sid}': slide file not found (recorded path: {attrs.get('slide_path') or 'none'}); "
                           "pass the slide file instead of its id (it was moved or deleted)")
    check_slide_matches(path, attrs, h5)
    return path


def render(sm: SlideMap, slide_path: Path, attrs: dict, h5: Path, out_png: Path, kind: str, title_model: str,
           estimator: str = "instance") -> Path:
    """PNG, ``.csv`` and ``.geojson`` of a ``SlideMap`` (same stem)."""
    from wsi_ncmi.predict.geojson import write_patches_geojson
    from wsi_ncmi.slides.match import check_slide_matches
    from wsi_ncmi.slides.open import open_slide
    from wsi_ncmi.slides.tissue import read_thumbnail
    from wsi_ncmi.viz.heatmap import HeatmapPicture, draw_heatmap

    if kind not in KINDS:
        raise WsiNcmiError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    s = open_slide(slide_path)
    try:
        check_slide_matches(slide_path, attrs, h5, s.dimensions)
        mpp = float(attrs.get("mpp_x", 0) or 0) or float(s.properties.get("openslide.mpp-x", 1.0))
        thumb, sx, sy = read_thumbnail(s, mpp, max(mpp, mpp * s.dimensions[0] / 1600))
    finally:
        s.close()
    pred = int(np.argmax(sm.probs))
    cname = sm.classes[sm.target]
    how = "patch alone" if estimator == "instance" else "patch removed"
    pic = HeatmapPicture(thumb, (sx, sy), sm.coords, sm.extent, sm.rank,
                         f"{sm.slide_id}: predicted {sm.classes[pred]} (p={sm.probs[pred]:.2f})",
                         f"{title_model} attention" + (f" ({len(sm.coords)} patches, overlapping)"
                                                       if len(sm.coords) > sm.stored else ""),
                         sm.information if kind == "info" else None,
                         f"information for class {cname} (infoCAM, {how})")
    draw_heatmap(pic, out_png)
    with open(out_png.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "attention", f"info_{cname}"])
        for (cx, cy), a, i in zip(sm.coords, sm.attention, sm.information):
            w.writerow([int(cx), int(cy), f"{a:.6g}", f"{i:.6g}"])
    write_patches_geojson(out_png.with_suffix(".geojson"), sm.coords, sm.extent,
                          {"attention": sm.attention, "information": sm.information}, sm.slide_id)
    return out_png


def heatmap_for_slide(members: list[Member], h5: Path, out_png: Path, slide: str | None = None, kind: str = "attention",
                      target: str | None = None, estimator: str = "instance", max_evals: int = 2048,
                      overlap: float = 0.0, encoder: Callable | None = None, features=None) -> tuple[Path, int, float]:
    """Draw one slide: (PNG path, patches drawn, seconds). ``encoder``: a callable returning the
    run's encoder, called only when ``overlap`` needs new patches."""
    from wsi_ncmi.predict.shifted import extract_shifted, shifts_per_axis
    from wsi_ncmi.store.h5 import read_feature_file

    t0 = time.perf_counter()
    shifts_per_axis(overlap)                 # a bad --overlap fails before any work
    ff = features if features is not None else read_feature_file(h5)
    sid = ff.attrs.get("slide_id") or h5.stem
    path = find_slide_file(slide, ff.attrs, sid, h5)
    shifted = extract_shifted(path, ff.attrs, ff.coords, encoder(), overlap) if overlap > 0 else None
    sm = slide_map(members, ff.features, ff.coords, ff.attrs, sid, target, estimator, max_evals, shifted)
    rm = members[0].model
    render(sm, path, ff.attrs, h5, out_png, kind, f"{rm.cfg.model}/{rm.cfg.loss}", estimator)
    return out_png, len(sm.coords), time.perf_counter() - t0
