"""Planning one slide: open, mpp, tissue, grid, pictures, and the attributes of its HDF5 file.

Runs in the main process (a few threads), ahead of the patch readers; every way a slide can fail
before its first patch is found here and reported as a ``SlideError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide

from wsi_ncmi import __version__
from wsi_ncmi.errors import SlideError
from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.slides.geojson import GeoJSONError, reads_back_exactly
from wsi_ncmi.slides.grid import PatchGrid, plan_grid
from wsi_ncmi.slides.mpp import Mpp, resolve_mpp
from wsi_ncmi.slides.open import background_color, level_downsamples, open_slide, slide_bounds, slide_id_for
from wsi_ncmi.slides.pen import RULE as PEN_RULE
from wsi_ncmi.slides.rawjpeg import probe_raw_jpeg
from wsi_ncmi.slides.tissue import tissue_geojson, tissue_mask_for_slide


@dataclass
class SlidePlan:
    slide_id: str
    path: Path
    mpp: Mpp
    grid: PatchGrid
    attrs: dict = field(default_factory=dict)
    coords_attrs: dict = field(default_factory=dict)
    plan_seconds: float = 0.0
    reader: str = "openslide"       # "raw-jpeg" (verified raw tiles) or "openslide"
    raw_page: int = -1              # TIFF page of the read level for "raw-jpeg"
    background: tuple = (255, 255, 255)




def settings_fingerprint(cfg: ExtractConfig, tissue_source: str = "detection") -> str:
    """What makes two feature files of one slide comparable (not how fast they were made).

    ``tissue_source`` is per slide ("detection" or "geojson:<sha256>"), so a slide whose tissue
    GeoJSON was edited after extraction no longer matches its old file.
    """
    keys = ("encoder", "mpp", "patch_size", "min_tissue", "tissue_mpp", "min_saturation", "max_saturation",
            "min_region_um2", "max_hole_um2", "remove_pen", "encoder_input")
    d = {k: getattr(cfg, k) for k in keys}
    d["weights"] = Path(cfg.weights).name if cfg.weights else None
    d["tissue_source"] = tissue_source
    return json.dumps(d, sort_keys=True)


def tissue_source_for(cfg: ExtractConfig, slide_id: str) -> str:
    """"geojson:<sha256>" when ``--tissue-geojson`` has a file for this slide, else "detection"."""
    p = cfg.geojson_for(slide_id)
    return "detection" if p is None else f"geojson:{hashlib.sha256(p.read_bytes()).hexdigest()}"


def plan_slide(path: Path, cfg: ExtractConfig, csv_mpp: dict | None, out: Path) -> SlidePlan:
    t0 = time.perf_counter()
    sid = slide_id_for(path)
    slide = open_slide(path)
    try:
        mpp = resolve_mpp(slide, path, sid, csv_mpp, cfg.slide_mpp)
        params = cfg.tissue_params()
        geojson = cfg.geojson_for(sid)
        try:
            tm = tissue_mask_for_slide(slide, mpp.mean, params, geojson, cfg.remove_pen)
        except openslide.OpenSlideError as exc:
            raise SlideError(path, "unreadable", f"read error while making the thumbnail ({exc}); "
                                                 "the file is damaged: copy or scan it again") from None
        except GeoJSONError as exc:
            raise SlideError(path, "bad-geojson", str(exc)) from None
        grid = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, cfg.mpp, cfg.patch_size, tm,
                         cfg.min_tissue)
        w0, h0 = slide.dimensions
        if grid.n_cells == 0:
            raise SlideError(path, "too-small",
                             f"slide is {w0 * mpp.x:.0f} x {h0 * mpp.y:.0f} um, smaller than one patch "
                             f"({cfg.patch_size * cfg.mpp:.0f} um); lower --patch-size or --mpp")
        if not tm.mask.any() and geojson is not None:
            raise SlideError(path, "no-tissue", f"the polygons of {geojson} cover none of the slide"
                                                f"{' once pen marks are removed' if tm.pen_fraction else ''}; "
                                                "draw the tissue there or remove the file to use detection")
        if not tm.mask.any():
            raise SlideError(path, "no-tissue", f"no tissue found (saturation threshold {tm.threshold:.0f}); "
                                                "check the slide, or lower --min-saturation")
        if len(grid) == 0:
            raise SlideError(path, "no-tissue", f"no patch is at least {cfg.min_tissue:.0%} tissue "
                                                f"({tm.tissue_fraction:.1%} of the slide is tissue); lower --min-tissue")
        reader, raw_page, reader_note = "openslide", -1, "--reader openslide"
        if cfg.reader == "auto":
            level, why = probe_raw_jpeg(path, slide, grid.read_level)
            if level is not None:
                reader, raw_page, reader_note = "raw-jpeg", level.page, ""
            else:
                reader_note = why
        export_obj = tissue_geojson(tm, sid)
        exported = json.dumps(export_obj)
        export_sha = (hashlib.sha256(exported.encode()).hexdigest()
                      if reads_back_exactly(export_obj, tm.mask, tm.scale_x, tm.scale_y) else "")
        if cfg.thumbnails:
            from wsi_ncmi.viz.thumbnails import save_grid_thumbnail

            (out / "tissue").mkdir(exist_ok=True)
            export = out / "tissue" / f"{sid}.geojson"
            if not (geojson is not None and export.exists() and os.path.samefile(export, geojson)):
                export.write_text(exported)   # never overwrite the input mask
            save_grid_thumbnail(out / "thumbnails" / f"{sid}.png", tm, grid)
        st = path.stat()
        attrs = {
            "slide_id": sid, "slide_path": str(path.resolve()), "slide_size_bytes": st.st_size,
            "slide_mtime": st.st_mtime, "slide_vendor": slide.properties.get("openslide.vendor", "image"),
            "level0_width": w0, "level0_height": h0, "level_downsamples": level_downsamples(slide),
            "mpp_x": mpp.x, "mpp_y": mpp.y, "mpp_source": mpp.source,
            "target_mpp": cfg.mpp, "patch_size": cfg.patch_size,
            "patch_size_level0_x": grid.extent_x, "patch_size_level0_y": grid.extent_y,
            "read_level": grid.read_level, "read_downsample": grid.read_downsample,
            "reader": reader, "reader_note": reader_note,
            "tissue_method": params.to_dict(), "tissue_threshold": tm.threshold, "min_tissue": cfg.min_tissue,
            "tissue_source": tm.source, "tissue_geojson": str(geojson.resolve()) if geojson else "",
            "encoder_input": cfg.encoder_input,
            "remove_pen": cfg.remove_pen, "pen_rule": PEN_RULE if cfg.remove_pen else "",
            "pen_fraction": tm.pen_fraction,
            # set when the export reads back to this very mask: an unedited export passed back
            # with --tissue-geojson is recognised by this hash and does not make the file stale
            "tissue_export_sha256": export_sha,
            "grid_cells": grid.n_cells, "settings_fingerprint": settings_fingerprint(cfg, tm.source),
            "package": "wsi-ncmi", "package_version": __version__, "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
        }
        background = background_color(slide)
        coords_attrs = {"patch_level": 0, "patch_size": int(round(grid.extent_x)),
                        "patch_size_level0": int(round(grid.extent_x)), "target_patch_size": cfg.patch_size,
                        "target_mpp": cfg.mpp, "name": sid}
    finally:
        slide.close()
    return SlidePlan(sid, path, mpp, grid, attrs, coords_attrs, time.perf_counter() - t0, reader, raw_page,
                     background)


def tissue_fraction_dataset(grid: PatchGrid) -> np.ndarray:
    return grid.tissue_fraction.astype(np.float16)
