"""Does the attention find the lesions? Lesion average precision on the demo's test slides.

The demo knows where every lesion is (``lesions.json``: centre and diameter in µm), so a model's
attention can be scored as a detector: on each micro and macro test slide, rank the patches by
attention and compute the average precision against "the patch touches a lesion" (the disc and
the patch square overlap). Slides are scored one by one, because attention is normalised within a
bag, and the slide APs are averaged; the chance level is the mean fraction of touching patches.
Only micro and macro slides are scored (issue #14's definition): an ITC cluster covers at most part
of the few patches it touches, so "touches" says little about what the patch shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORED_LABELS = (2, 3)   # micro, macro


def patches_touching(coords: np.ndarray, extent: tuple[float, float], lesions: list[dict], mpp0: float) -> np.ndarray:
    """(N,) bool: the level-0 patch square at ``coords`` (top-left, px) overlaps a lesion disc.

    A disc and an axis-aligned box overlap when the box point nearest the disc centre lies within
    the radius. ``mpp0``: the slide's level-0 µm/px (lesions are in µm; the demo's pixels are square).
    """
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    touch = np.zeros(len(c), bool)
    for les in lesions:
        cx, cy, r = les["x_um"] / mpp0, les["y_um"] / mpp0, les["diameter_um"] / 2 / mpp0
        dx = np.maximum(np.maximum(c[:, 0] - cx, 0.0), cx - (c[:, 0] + extent[0]))
        dy = np.maximum(np.maximum(c[:, 1] - cy, 0.0), cy - (c[:, 1] + extent[1]))
        touch |= dx * dx + dy * dy <= r * r
    return touch


@dataclass
class LesionAP:
    ap: float            # mean over members (seeds) of the mean slide AP
    std: float           # across members (ddof=1, as every other "mean ± std over seeds")
    chance: float        # mean fraction of touching patches (the AP of a random ranking)
    slides: int
    per_slide: dict      # slide_id -> list of APs, one per member


def lesion_ap(run: str | Path, features: str | Path, plan: list[dict], test_centres: tuple[int, ...] = (3, 4),
              seeds: list[int] | None = None, slide_ids: set[str] | None = None) -> LesionAP:
    """Lesion AP of the seeds of ``run`` (``seeds``, default all) on the micro and macro slides of the
    test centres that have both touching and other patches; ``slide_ids`` instead of the test
    centres scores those slides (the demo's validation split)."""
    from wsi_ncmi.store.h5 import read_feature_file

    def bags():
        for s in plan:
            chosen = s["centre"] in test_centres if slide_ids is None else s["slide_id"] in slide_ids
            if not chosen or s["label"] not in SCORED_LABELS:
                continue
            ff = read_feature_file(Path(features) / f"{s['slide_id']}.h5")
            a = ff.attrs
            extent = (float(a["patch_size_level0_x"]), float(a["patch_size_level0_y"]))
            yield s["slide_id"], ff.features, patches_touching(ff.coords, extent, s["lesions"], float(a["mpp_x"]))

    return attention_ap(run, bags(), seeds)


def attention_ap(run: str | Path, bags: Iterable[tuple[str, np.ndarray, np.ndarray]],
                 seeds: list[int] | None = None) -> LesionAP:
    """Average precision of each member's attention against known positive instances.

    ``bags`` yields ``(slide_id, features (N, D), truth (N,) bool)``; a bag whose instances are all
    positive, or none, has no AP and is skipped. Used for the demo's lesions and for generated bags
    that record their tumour instances (``benchmarks/ablation.py``).
    """
    import torch
    from sklearn.metrics import average_precision_score

    from wsi_ncmi.predict.members import load_members, score_bag

    members, per_slide, chance = None, {}, []
    for slide_id, x, truth in bags:
        truth = np.asarray(truth, bool)
        if truth.all() or not truth.any():
            continue
        x = np.asarray(x, np.float32)
        if members is None:
            members = [m for m in load_members(run, x.shape[1])
                       if seeds is None or m.name in {f"seed_{k}" for k in seeds}]
            if not members:
                raise ValueError(f"{run}: none of seeds {seeds} is trained")
        bag = score_bag(members, torch.from_numpy(x))
        per_slide[slide_id] = [float(average_precision_score(truth, att)) for att in bag.attention]
        chance.append(float(truth.mean()))
    if not per_slide:
        return LesionAP(float("nan"), float("nan"), float("nan"), 0, {})
    from wsi_ncmi.train.metrics import mean_std

    per_member = np.array(list(per_slide.values())).mean(0)
    return LesionAP(*mean_std(per_member), float(np.mean(chance)), len(per_slide), per_slide)
