"""Attention heatmaps: a trained run's instance attention drawn over the slide thumbnail.

Each patch footprint (from the HDF5 ``coords`` and the recorded level-0 patch size) is coloured
by the rank of its attention within the slide (ranks, not raw values: attention is heavy-tailed
and a few patches would otherwise wash out the rest), blended over the tissue thumbnail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError


def slide_attention(run: Path, slide_id: str, features: Path, seed: int) -> tuple[np.ndarray, dict, np.ndarray, list]:
    """(attention (N,), feature-file attrs, coords (N, 2), class scores) of one slide under a run's best model."""
    from wsi_ncmi.mil.models import create_mil_model
    from wsi_ncmi.store.h5 import read_feature_file
    from wsi_ncmi.train.config import TrainConfig

    cfg = TrainConfig.from_sources(str(run / "config.yaml"))
    ckpt = run / f"seed_{seed}" / "best.pt"
    if not ckpt.is_file():
        raise WsiNcmiError(f"{ckpt}: no checkpoint; train the run first (or pick --seed)")
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    h5 = features / f"{slide_id}.h5"
    if not h5.is_file():
        raise WsiNcmiError(f"{h5}: no features for slide '{slide_id}'; pass --features with the extraction folder")
    ff = read_feature_file(h5)
    st = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = create_mil_model(cfg.model, ff.features.shape[1], len(classes), dropout=cfg.dropout)
    model.load_state_dict(st["model"])
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ff.features.astype(np.float32))[None])
    probs = torch.softmax(out.logits.float(), 1)[0].tolist()
    return out.attention[0].float().numpy(), ff.attrs, ff.coords, [classes, probs]


def save_heatmap(run: str | Path, slide: str, features: str | Path | None = None, seed: int = 0,
                 out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_ncmi.slides.open import open_slide, slide_id_for
    from wsi_ncmi.slides.tissue import read_thumbnail
    from wsi_ncmi.train.config import TrainConfig

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise WsiNcmiError(f"{run}: not a training run folder (no config.yaml)")
    cfg = TrainConfig.from_sources(str(run / "config.yaml"))
    features = Path(features or cfg.features)
    sid = slide_id_for(slide) if Path(slide).suffix else slide
    att, attrs, coords, (classes, probs) = slide_attention(run, sid, features, seed)
    path = Path(slide) if Path(slide).is_file() else Path(attrs.get("slide_path", ""))
    if not path.is_file():
        raise WsiNcmiError(f"slide '{sid}': slide file not found (recorded path: {attrs.get('slide_path')}); "
                           "pass the slide file instead of its id")
    s = open_slide(path)
    mpp = float(attrs.get("mpp_x", 0) or 0) or float(s.properties.get("openslide.mpp-x", 1.0))
    w0 = s.dimensions[0]
    thumb_mpp = max(mpp, mpp * w0 / 1600)
    thumb, sx, sy = read_thumbnail(s, mpp, thumb_mpp)
    s.close()
    ext = float(attrs.get("patch_size_level0_x", 0) or 0) or float(coords[1, 0] - coords[0, 0] if len(coords) > 1 else 256)
    rank = att.argsort().argsort() / max(1, len(att) - 1)
    heat = np.full(thumb.shape[:2], np.nan)
    for (x, y), r in zip(coords, rank):
        heat[int(y / sy):int(np.ceil((y + ext) / sy)), int(x / sx):int(np.ceil((x + ext) / sx))] = r
    fig, ax = plt.subplots(1, 2, figsize=(13, 6.5 * thumb.shape[0] / thumb.shape[1] + 0.8))
    ax[0].imshow(thumb)
    ax[0].set_title(sid, fontsize=10)
    ax[1].imshow(thumb)
    im = ax[1].imshow(np.ma.masked_invalid(heat), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    pred = int(np.argmax(probs))
    ax[1].set_title(f"{cfg.model}/{cfg.loss} attention (rank); predicted {classes[pred]} (p={probs[pred]:.2f})",
                    fontsize=10)
    for a in ax:
        a.axis("off")
    fig.colorbar(im, ax=ax[1], fraction=0.03, label="attention rank within slide")
    fig.tight_layout()
    out = Path(out) if out else run / "heatmaps" / f"{sid}_seed{seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
