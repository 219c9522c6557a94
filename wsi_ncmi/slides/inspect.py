"""``wsi-ncmi info``: what a slide is, and whether extraction would succeed on it."""

from __future__ import annotations

from pathlib import Path

from wsi_ncmi.errors import SlideError
from wsi_ncmi.slides.geojson import GeoJSONError, geojson_for
from wsi_ncmi.slides.grid import plan_grid
from wsi_ncmi.slides.mpp import resolve_mpp
from wsi_ncmi.slides.open import level_downsamples, open_slide, slide_bounds, slide_id_for
from wsi_ncmi.slides.patches import PatchReader
from wsi_ncmi.slides.tissue import TissueParams, tissue_mask_for_slide


def describe_slide(path: str | Path, target_mpp: float = 0.5, patch_size: int = 256, min_tissue: float = 0.25,
                   csv_mpp: dict | None = None, default_mpp: float | None = None,
                   tissue: TissueParams = TissueParams(), geojson_dir: str | Path | None = None,
                   remove_pen: bool = False) -> dict:
    """Levels, dimensions, mpp and its source, vendor; then a dry run of planning and a few reads.

    ``geojson_dir`` and ``remove_pen`` shape the tissue mask as ``extract --tissue-geojson`` and
    ``--remove-pen`` do (``<dir>/<slide_id>.geojson`` when it exists, detection otherwise), so the
    patch count is the one extraction would get."""
    path = Path(path)
    info: dict = {"slide_id": slide_id_for(path), "path": str(path), "ok": False}
    try:
        slide = open_slide(path)
    except SlideError as exc:
        info.update(reason=exc.reason, error=str(exc))
        return info
    try:
        info["vendor"] = slide.properties.get("openslide.vendor", "image")
        info["levels"] = [{"level": i, "width": w, "height": h, "downsample": d}
                          for i, ((w, h), d) in enumerate(zip(slide.level_dimensions, level_downsamples(slide)))]
        info["objective_power"] = slide.properties.get("openslide.objective-power")
        mpp = resolve_mpp(slide, path, info["slide_id"], csv_mpp, default_mpp)
        info["mpp"] = {"x": mpp.x, "y": mpp.y, "source": mpp.source}
        try:
            tm = tissue_mask_for_slide(slide, mpp.mean, tissue, geojson_for(geojson_dir, info["slide_id"]), remove_pen)
        except GeoJSONError as exc:
            raise SlideError(path, "bad-geojson", str(exc)) from None
        info["tissue_source"] = tm.source
        grid = plan_grid(slide_bounds(slide), level_downsamples(slide), mpp, target_mpp, patch_size, tm, min_tissue)
        info["tissue_fraction"] = round(tm.tissue_fraction, 4)
        info["patches"] = len(grid)
        info["read_level"] = grid.read_level
        info["patch_size_level0"] = round(grid.extent_x, 3)
        if len(grid) == 0:
            raise SlideError(path, "no-tissue", f"no {patch_size} px patch at {target_mpp} um/px is at least "
                                                f"{min_tissue:.0%} tissue; lower --min-tissue or check the slide")
        reader = PatchReader(slide, grid.read_level, grid.read_downsample, grid.extent_x, grid.extent_y, patch_size)
        for k in sorted({0, len(grid) // 2, len(grid) - 1}):
            reader.read(*(int(v) for v in grid.coords[k]))
        info["ok"] = True
    except SlideError as exc:
        info.update(reason=exc.reason, error=str(exc))
    except Exception as exc:  # OpenSlide read errors and the like
        info.update(reason="unreadable", error=f"{path}: {type(exc).__name__}: {exc}; the file is damaged")
    finally:
        slide.close()
    return info


def render_info(info: dict) -> str:
    lines = [f"{info['path']}"]
    if "vendor" in info:
        lines.append(f"  vendor        {info['vendor']}")
        for lv in info["levels"]:
            lines.append(f"  level {lv['level']:<7} {lv['width']} x {lv['height']}  (downsample {lv['downsample']:.4f})")
    if "mpp" in info:
        m = info["mpp"]
        lines.append(f"  mpp           {m['x']:.4f} x {m['y']:.4f} um/px  (source: {m['source']})")
    if "patches" in info:
        lines.append(f"  tissue        {info['tissue_fraction']:.1%} of the slide; {info['patches']} patches, "
                     f"read from level {info['read_level']} ({info['patch_size_level0']} level-0 px each)")
    lines.append("  extraction    " + ("would succeed" if info["ok"] else f"would FAIL [{info['reason']}]: {info['error']}"))
    return "\n".join(lines)
