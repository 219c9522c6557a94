"""Heatmap pictures: per-patch values painted over a slide thumbnail. Drawing only.

Why drawing only: loading a run's model and extracting patches belong to ``wsi_ncmi.predict``
(which loads models through ``train.inference``); this module gets arrays and writes a PNG, so it
can draw values of any origin.

* ``attention``: each patch is coloured by the rank of its attention within its bag (ranks, not
  raw values: attention is heavy-tailed and a few patches would otherwise wash out the rest).
* ``info``: the information map (infoCAM contrast for one class, ``wsi_ncmi.mil.information``) on a
  diverging scale: red patches carry evidence for the class, blue against.

Rendering is smooth: each thumbnail pixel shows the mean value of the patches covering it, so
overlapping patches (``--overlap``) give a finer map instead of the last patch drawn winning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def paint(shape: tuple[int, int], coords: np.ndarray, ext: tuple[float, float], scale: tuple[float, float],
          values: np.ndarray) -> np.ma.MaskedArray:
    """(H, W) mean of ``values`` over the patches covering each pixel; masked where none does.

    Patch i covers level-0 [x, x + ext_x) x [y, y + ext_y); a thumbnail pixel covers ``scale``
    level-0 px. Sums and counts are built from 2-D difference arrays: O(N + H * W).
    """
    h, w = shape
    sx, sy = scale
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    x0 = np.clip(np.floor(c[:, 0] / sx).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(c[:, 1] / sy).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.ceil((c[:, 0] + ext[0]) / sx).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((c[:, 1] + ext[1]) / sy).astype(np.int64), y0 + 1), 0, h)
    v = np.asarray(values, np.float64).reshape(-1)
    acc = np.zeros((2, h + 1, w + 1))
    for k, val in enumerate((v, np.ones_like(v))):
        np.add.at(acc[k], (y0, x0), val)
        np.add.at(acc[k], (y0, x1), -val)
        np.add.at(acc[k], (y1, x0), -val)
        np.add.at(acc[k], (y1, x1), val)
    s, n = acc.cumsum(1).cumsum(2)[:, :h, :w]
    with np.errstate(invalid="ignore", divide="ignore"):
        heat = np.where(n > 0.5, s / np.maximum(n, 1), np.nan)
    return np.ma.masked_invalid(heat)


@dataclass
class HeatmapPicture:
    """What one picture shows: the thumbnail, the patch footprints and their values."""

    thumbnail: np.ndarray          # (H, W, 3) uint8
    scale: tuple[float, float]     # level-0 px per thumbnail px (x, y)
    coords: np.ndarray             # (N, 2) level-0 top-left of each patch
    extent: tuple[float, float]    # level-0 px covered by one patch (x, y)
    attention_rank: np.ndarray     # (N,) in [0, 1]
    title: str
    attention_title: str
    info: np.ndarray | None = None  # (N,) information contrast, nats
    info_title: str = ""


def draw_heatmap(pic: HeatmapPicture, out: str | Path) -> Path:
    """Thumbnail | attention [| information] side by side, written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumb = pic.thumbnail
    shape = thumb.shape[:2]
    panels = 3 if pic.info is not None else 2
    fig, ax = plt.subplots(1, panels, figsize=(6.5 * panels, 6.5 * shape[0] / shape[1] + 0.8))
    ax[0].imshow(thumb)
    ax[0].set_title(pic.title, fontsize=10)
    ax[1].imshow(thumb)
    im = ax[1].imshow(paint(shape, pic.coords, pic.extent, pic.scale, pic.attention_rank), cmap="inferno",
                      alpha=0.55, vmin=0, vmax=1)
    ax[1].set_title(pic.attention_title, fontsize=10)
    fig.colorbar(im, ax=ax[1], fraction=0.03, label="attention rank within slide")
    if pic.info is not None:
        lim = float(np.percentile(np.abs(pic.info), 99)) if len(pic.info) else 0.0
        lim = lim or 1e-6
        ax[2].imshow(thumb)
        im = ax[2].imshow(paint(shape, pic.coords, pic.extent, pic.scale, pic.info), cmap="RdBu_r", alpha=0.65,
                          vmin=-lim, vmax=lim)
        ax[2].set_title(pic.info_title, fontsize=10)
        fig.colorbar(im, ax=ax[2], fraction=0.03, label="i(patch; class) - mean over other classes (nats)")
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
