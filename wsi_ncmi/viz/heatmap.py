"""Slide heatmaps of a trained run: instance attention, and per-patch information (infoCAM).

* ``attention``: each patch footprint (HDF5 ``coords`` and the recorded level-0 patch size) is
  coloured by the rank of its attention within the slide (ranks, not raw values: attention is
  heavy-tailed and a few patches would otherwise wash out the rest), blended over the thumbnail.
* ``info``: the attention map beside the information map of ``wsi_ncmi.mil.information`` (either
  estimator) for the
  predicted (or a chosen) class, on a diverging scale: red patches carry evidence for the class,
  blue against. The per-patch values are also written to a CSV next to the PNG.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError

KINDS = ("attention", "info")


def _paint(shape, coords, ext, sx, sy, values) -> np.ndarray:
    heat = np.full(shape, np.nan)
    for (x, y), v in zip(coords, values):
        heat[int(y / sy):int(np.ceil((y + ext) / sy)), int(x / sx):int(np.ceil((x + ext) / sx))] = v
    return np.ma.masked_invalid(heat)


def save_heatmap(run: str | Path, slide: str, features: str | Path | None = None, seed: int = 0,
                 out: str | Path | None = None, kind: str = "attention", target: str | None = None,
                 estimator: str = "instance", max_evals: int = 2048) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsi_ncmi.mil.information import ESTIMATORS, info_contrast, instance_information, removal_information
    from wsi_ncmi.slides.match import check_slide_matches
    from wsi_ncmi.slides.open import open_slide, slide_id_for
    from wsi_ncmi.slides.tissue import read_thumbnail
    from wsi_ncmi.store.h5 import read_feature_file
    from wsi_ncmi.train.inference import load_run_model
    from wsi_ncmi.train.runfolder import load_run_config, settings_folder

    if kind not in KINDS:
        raise WsiNcmiError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if estimator not in ESTIMATORS:
        raise WsiNcmiError(f"--estimator {estimator}: choose one of {', '.join(ESTIMATORS)}")
    run = Path(run)
    features = Path(features or load_run_config(settings_folder(run), require=()).features)
    sid = slide_id_for(slide) if Path(slide).suffix else slide
    h5 = features / f"{sid}.h5"
    if not h5.is_file():
        raise WsiNcmiError(f"{h5}: no features for slide '{sid}'; pass --features with the extraction folder")
    ff = read_feature_file(h5)
    rm = load_run_model(run, seed, ff.features.shape[1])
    x = torch.from_numpy(ff.features.astype(np.float32))
    with torch.no_grad():
        o = rm.model(x[None])
    probs = rm.log_scores(o)[0].exp().tolist()
    att = o.attention[0].float().numpy()
    pred = int(np.argmax(probs))
    cls = pred
    if target is not None:
        if target not in rm.classes:
            raise WsiNcmiError(f"--target-class {target}: not a class of this run ({', '.join(rm.classes)})")
        cls = rm.classes.index(target)
    info = None
    if kind == "info":
        pmi = instance_information(rm.model, rm.log_scores, x, rm.priors, includes_prior=rm.includes_prior) \
            if estimator == "instance" else removal_information(rm.model, rm.log_scores, x, ff.coords, max_evals,
                                                                priors=rm.priors, includes_prior=rm.includes_prior)[0]
        info = info_contrast(pmi, cls)

    attrs = ff.attrs
    path = Path(slide) if Path(slide).is_file() else Path(attrs.get("slide_path", ""))
    if not path.is_file():
        raise WsiNcmiError(f"slide '{sid}': slide file not found (recorded path: {attrs.get('slide_path')}); "
                           "pass the slide file instead of its id")
    check_slide_matches(path, attrs, h5)
    s = open_slide(path)
    check_slide_matches(path, attrs, h5, s.dimensions)
    mpp = float(attrs.get("mpp_x", 0) or 0) or float(s.properties.get("openslide.mpp-x", 1.0))
    thumb, sx, sy = read_thumbnail(s, mpp, max(mpp, mpp * s.dimensions[0] / 1600))
    s.close()
    coords = ff.coords
    ext = float(attrs.get("patch_size_level0_x", 0) or 0) or float(coords[1, 0] - coords[0, 0] if len(coords) > 1 else 256)
    rank = att.argsort().argsort() / max(1, len(att) - 1)

    panels = 3 if info is not None else 2
    fig, ax = plt.subplots(1, panels, figsize=(6.5 * panels, 6.5 * thumb.shape[0] / thumb.shape[1] + 0.8))
    ax[0].imshow(thumb)
    ax[0].set_title(f"{sid}: predicted {rm.classes[pred]} (p={probs[pred]:.2f})", fontsize=10)
    ax[1].imshow(thumb)
    im = ax[1].imshow(_paint(thumb.shape[:2], coords, ext, sx, sy, rank), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    ax[1].set_title(f"{rm.cfg.model}/{rm.cfg.loss} attention", fontsize=10)
    fig.colorbar(im, ax=ax[1], fraction=0.03, label="attention rank within slide")
    if info is not None:
        lim = float(np.percentile(np.abs(info), 99)) or 1e-6
        ax[2].imshow(thumb)
        im = ax[2].imshow(_paint(thumb.shape[:2], coords, ext, sx, sy, info), cmap="RdBu_r", alpha=0.65,
                          vmin=-lim, vmax=lim)
        how = "patch alone" if estimator == "instance" else "patch removed"
        ax[2].set_title(f"information for class {rm.classes[cls]} (infoCAM, {how})", fontsize=10)
        fig.colorbar(im, ax=ax[2], fraction=0.03, label="i(patch; class) - mean over other classes (nats)")
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    suffix = "" if kind == "attention" else "_info"
    out = Path(out) if out else run / "heatmaps" / f"{sid}_seed{seed}{suffix}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "attention"] + ([f"info_{rm.classes[cls]}"] if info is not None else []))
        for i, (cx, cy) in enumerate(coords):
            w.writerow([int(cx), int(cy), f"{att[i]:.6g}"] + ([f"{info[i]:.6g}"] if info is not None else []))
    return out
