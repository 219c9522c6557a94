"""Overlapping patches of one slide, embedded on the fly for a finer heatmap.

Why: a map at the training grid has one value per patch; a tumour edge falls anywhere inside a
patch. With ``--overlap o`` the grid is shifted by ``stride = patch * (1 - o)`` in x and y
(n = 1 / (1 - o) shifts per axis); every shifted grid is a bag of the training's density, scored
as a whole by the model (attention is relative to the bag, so bags are never merged), and the
picture averages every patch covering a pixel.

Which shifted patches exist: those extraction would have kept had its grid started there. The
tissue mask is made again with the parameters recorded in the feature file and each shifted grid is
laid by the extraction's own ``plan_grid`` (same ``min_tissue``), so a shifted bag holds patches of
the kind the model was trained on; patches mostly on background, which a model never saw, would
otherwise draw attention at the tissue edge. A tissue mask made some other way (not recorded as
the built-in method) falls back to the stored grid itself as the mask: shifted patches lying at
least half on stored patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError

MAX_OVERLAP = 0.9


@dataclass
class ShiftedBag:
    offset: tuple[int, int]      # shift in strides (i, j); (0, 0) is the stored grid
    coords: np.ndarray           # (N, 2) level-0 top-left
    features: np.ndarray         # (N, D) float32


def shifts_per_axis(overlap: float) -> int:
    """n such that the stride is patch / n; overlap must be 1 - 1/n (0.5, 0.667, 0.75, 0.8 ...)."""
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise WsiNcmiError(f"--overlap {overlap}: use a fraction from 0 to {MAX_OVERLAP} (e.g. 0.5 or 0.75)")
    n = int(round(1.0 / (1.0 - overlap)))
    if abs(n * (1.0 - overlap) - 1.0) > 0.02:
        raise WsiNcmiError(f"--overlap {overlap}: the stride must divide the patch; use 1 - 1/n: 0.5, 0.667, 0.75, "
                           "0.8 or 0.875")
    return n


def shifted_grids(coords: np.ndarray, bounds: tuple[int, int, int, int], extent: tuple[float, float],
                  n: int) -> dict[tuple[int, int], np.ndarray]:
    """Level-0 coords of each shifted grid (i, j) != (0, 0), kept where at least half on stored patches
    (the fallback for tissue masks that cannot be made again)."""
    bx, by, bw, bh = bounds
    ex, ey = extent
    c = np.asarray(coords, np.int64)
    k = np.round((c[:, 0] - bx) / ex).astype(np.int64)
    l_ = np.round((c[:, 1] - by) / ey).astype(np.int64)
    nx, ny = int(k.max()) + 1, int(l_.max()) + 1
    sub = np.zeros(((ny + 2) * n, (nx + 2) * n), np.float64)    # one cell per stride, a stored patch padded around
    for kk, ll in zip(k, l_):
        sub[(ll + 1) * n:(ll + 2) * n, (kk + 1) * n:(kk + 2) * n] = 1.0
    integ = np.zeros((sub.shape[0] + 1, sub.shape[1] + 1))
    integ[1:, 1:] = sub.cumsum(0).cumsum(1)
    gk, gl = np.meshgrid(np.arange(-1, nx + 1), np.arange(-1, ny + 1))
    gk, gl = gk.ravel(), gl.ravel()
    out = {}
    for j in range(n):
        for i in range(n):
            if i == 0 and j == 0:
                continue
            x0, y0 = (gk + 1) * n + i, (gl + 1) * n + j
            x1, y1 = np.minimum(x0 + n, sub.shape[1]), np.minimum(y0 + n, sub.shape[0])
            cover = (integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]) / (n * n)
            xs = bx + np.round(gk * ex + i * ex / n).astype(np.int64)
            ys = by + np.round(gl * ey + j * ey / n).astype(np.int64)
            inside = (xs >= bx) & (ys >= by) & (xs + ex <= bx + bw + 0.5) & (ys + ey <= by + bh + 0.5)
            keep = (cover >= 0.5) & inside
            order = np.lexsort((xs[keep], ys[keep]))           # row-major, as extraction writes grids
            out[(i, j)] = np.stack([xs[keep][order], ys[keep][order]], 1)
    return out


def tissue_grids(slide, attrs: dict, n: int) -> dict[tuple[int, int], np.ndarray] | None:
    """The shifted grids by the extraction's rule, or None when its tissue mask cannot be remade."""
    from wsi_ncmi.slides.grid import plan_grid
    from wsi_ncmi.slides.mpp import Mpp
    from wsi_ncmi.slides.open import level_downsamples, slide_bounds
    from wsi_ncmi.slides.tissue import TissueParams, tissue_mask_for_slide

    method = attrs.get("tissue_method")
    if not isinstance(method, dict) or method.get("method") != TissueParams().to_dict()["method"]:
        return None
    known = set(TissueParams().to_dict()) - {"method"}
    try:
        params = TissueParams(**{k: v for k, v in method.items() if k in known})
        mpp = Mpp(float(attrs["mpp_x"]), float(attrs["mpp_y"]), "recorded")
        target, size, min_tissue = float(attrs["target_mpp"]), int(attrs["patch_size"]), float(attrs["min_tissue"])
    except (KeyError, TypeError, ValueError):
        return None
    geojson = None
    if str(attrs.get("tissue_source", "detection")).startswith("geojson:"):    # the mask the features were cut with
        path = Path(str(attrs.get("tissue_geojson", "")))
        if not path.is_file() or "geojson:" + hashlib.sha256(path.read_bytes()).hexdigest() != attrs["tissue_source"]:
            return None                      # that mask is gone or edited: the stored-grid fallback
        geojson = path
    tm = tissue_mask_for_slide(slide, mpp.mean, params, geojson=geojson, remove_pen=bool(attrs.get("remove_pen")))
    bx, by, bw, bh = slide_bounds(slide)
    ex, ey = size * target / mpp.x, size * target / mpp.y
    out = {}
    for j in range(n):
        for i in range(n):
            if i or j:
                dx, dy = int(round(i * ex / n)), int(round(j * ey / n))
                out[(i, j)] = plan_grid((bx + dx, by + dy, bw - dx, bh - dy), level_downsamples(slide), mpp, target,
                                        size, tm, min_tissue).coords
    return out


@torch.no_grad()
def extract_shifted(slide_path: str | Path, attrs: dict, coords: np.ndarray, encoder, overlap: float,
                    batch: int = 32) -> list[ShiftedBag]:
    """Embed the shifted grids of one slide (the stored grid (0, 0) is not re-read), at the
    precision the stored features were made with on a GPU (fp32 on a CPU, as extraction does)."""
    from wsi_ncmi.slides.grid import choose_read_level
    from wsi_ncmi.slides.open import level_downsamples, open_slide, slide_bounds
    from wsi_ncmi.slides.patches import PatchReader

    n = shifts_per_axis(overlap)
    if n == 1 or len(coords) == 0:
        return []
    ex = float(attrs.get("patch_size_level0_x") or 0)
    ey = float(attrs.get("patch_size_level0_y") or ex)
    size = int(attrs.get("patch_size") or 0)
    if not ex or not size:
        raise WsiNcmiError(f"{slide_path}: its feature file records no patch size (not made by `wsi-ncmi extract`); "
                           "--overlap needs it: draw without --overlap")
    dtype = np.float16 if attrs.get("feature_dtype", "float16") == "float16" else np.float32
    device = next(encoder.parameters()).device
    precision = attrs.get("precision") if device.type == "cuda" and attrs.get("precision") in ("fp16", "bf16") \
        else "fp32"
    slide = open_slide(slide_path)
    try:
        grids = tissue_grids(slide, attrs, n)
        if grids is None:
            grids = shifted_grids(coords, slide_bounds(slide), (ex, ey), n)
        if attrs.get("read_level") not in (None, "") and attrs.get("read_downsample"):
            level, ds = int(attrs["read_level"]), float(attrs["read_downsample"])   # the level extraction read
        else:
            level, ds = choose_read_level(level_downsamples(slide), min(ex, ey) / size)
        reader = PatchReader(slide, level, ds, ex, ey, size)
        bags = []
        for off, cc in grids.items():
            if not len(cc):
                continue
            feats = [encoder(torch.from_numpy(reader.read_batch(cc[s:s + batch])).to(device), precision).cpu().numpy()
                     for s in range(0, len(cc), batch)]
            # stored like the extraction's files (float16 by default), so both grids are on one footing
            bags.append(ShiftedBag(off, cc, np.concatenate(feats).astype(dtype).astype(np.float32)))
    finally:
        slide.close()
    return bags
