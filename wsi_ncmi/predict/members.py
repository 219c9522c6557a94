"""The trained members of a run, and a slide scored by every one of them.

Why an ensemble: a run trains several seeds (and, with ``--folds``, each fold's seeds on other
slides); each is a model of its own. ``predict`` scores a slide with all of them and reports their
mean class probability beside each member's, so the spread between members is visible.

Members are the seed folders with a ``best.pt``: ``<run>/seed_<s>`` and
``<run>/fold_<k>/seed_<s>``. Each is loaded through ``train.inference`` and scores a bag by the
member's own rule (``scoring.pt``), so a member's probabilities are those ``evaluate`` writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.train.inference import RunModel, load_member_model

_SEED = re.compile(r"^seed_(\d+)$")
_FOLD = re.compile(r"^fold_(\d+)$")


@dataclass
class Member:
    name: str            # "seed_0" or "fold_1/seed_0"
    model: RunModel


@dataclass
class BagScore:
    """One bag scored by every member: (M, C) probabilities, (M, N) attention, (M,) entropy."""

    probs: np.ndarray
    attention: np.ndarray | None
    entropy: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.probs.mean(0)


def _num(p: Path, pattern) -> int:
    return int(pattern.match(p.name).group(1))


def member_dirs(run: Path) -> list[Path]:
    """Seed folders of a run holding a checkpoint, folds first by number, then seeds by number."""
    run = Path(run)
    seeds = sorted((d for d in run.glob("seed_*") if _SEED.match(d.name) and (d / "best.pt").is_file()),
                   key=lambda d: _num(d, _SEED))
    folds = sorted((d for d in run.glob("fold_*") if _FOLD.match(d.name) and d.is_dir()), key=lambda d: _num(d, _FOLD))
    for f in folds:
        seeds += sorted((d for d in f.glob("seed_*") if _SEED.match(d.name) and (d / "best.pt").is_file()),
                        key=lambda d: _num(d, _SEED))
    return seeds


def load_members(run: str | Path, in_dim: int) -> list[Member]:
    run = Path(run)
    dirs = member_dirs(run)
    if not dirs:
        if not (run / "config.yaml").is_file():
            raise WsiNcmiError(f"{run}: not a training run folder (no config.yaml); pass the --out of `wsi-ncmi train`")
        raise WsiNcmiError(f"{run}: no trained seed (no seed_*/best.pt); train the run first")
    members = [Member(d.relative_to(run).as_posix(), load_member_model(run, d, in_dim)) for d in dirs]
    classes = members[0].model.classes
    for m in members[1:]:
        if m.model.classes != classes:
            raise WsiNcmiError(f"{run / m.name}: classes {m.model.classes} differ from {members[0].name}'s {classes}; "
                               "the members of one run must share their classes")
    return members


def attention_entropy(a: torch.Tensor | None, n: int) -> float:
    """Entropy of the attention over the bag, divided by log N (1 = uniform), as training reports it."""
    if a is None or n <= 1:
        return float("nan")
    a = a.float().clamp_min(1e-12)
    return float(-(a * a.log()).sum() / math.log(n))


@torch.no_grad()
def score_bag(members: list[Member], x: torch.Tensor) -> BagScore:
    """Score one (N, D) float32 bag with every member."""
    probs, att, ent = [], [], []
    for m in members:
        out = m.model.model(x[None])
        probs.append(m.model.log_scores(out)[0].exp().numpy())
        a = out.attention[0] if out.attention is not None else None
        att.append(a.float().numpy() if a is not None else None)
        ent.append(attention_entropy(a, x.shape[0]))
    have_att = all(a is not None for a in att)
    return BagScore(np.stack(probs), np.stack(att) if have_att else None, np.array(ent))
