"""A trained run's model, loaded for scoring single slides (heatmaps, information maps).

``load_run_model`` rebuilds the aggregator and its objective from ``config.yaml`` and
``seed_<s>/best.pt`` and the scoring rule (``train/scoring.py``) from ``seed_<s>/scoring.pt``,
written at the end of training: softmax of the logits for every loss except NCMI, whose class
scores are its Bayes centroid scores with the training class means and the temperature fit on
validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.losses import Objective, create_objective
from wsi_ncmi.losses.pc_softmax import class_priors
from wsi_ncmi.mil.models.base import MILModel, MILOutput
from wsi_ncmi.train.checkpoint import load_checkpoint, load_state
from wsi_ncmi.train.config import TrainConfig, saved_config
from wsi_ncmi.train.scoring import PRIOR_FREE_LOSSES, Scorer


@dataclass
class RunModel:
    cfg: TrainConfig
    classes: list[str]
    model: MILModel
    objective: Objective
    priors: torch.Tensor          # training-split class frequencies
    scorer: Scorer

    @property
    def includes_prior(self) -> bool:
        """Whether the class scores hold the training prior (see ``train/scoring.py``)."""
        return self.scorer.includes_prior

    def scorer_inputs(self, out: MILOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, NCMI's P or None): what the scorer reads from a forward pass."""
        p = self.objective.distribution(out.logits.float(), out.embedding.float()) \
            if self.scorer.kind == "centroid" else None
        return out.logits.float(), p

    def log_scores(self, out: MILOutput) -> torch.Tensor:
        """(B, C) float64 log class scores of a forward pass, by the run's own scoring rule."""
        return self.scorer.log_scores(*self.scorer_inputs(out))

    def map_log_scores(self, out: MILOutput) -> torch.Tensor:
        """(B, C) float64 log class scores for the information maps (``Scorer.map_log_scores``)."""
        return self.scorer.map_log_scores(*self.scorer_inputs(out))


def load_run_model(run: str | Path, seed: int, in_dim: int) -> RunModel:
    """The model of ``<run>/seed_<seed>``."""
    return load_member_model(run, Path(run) / f"seed_{seed}", in_dim)


def _aggregate_record(run: Path, member: Path) -> dict:
    """Classes and training counts of a member: its fold's ``metrics.json`` (cross-validation runs
    train each fold on other slides), else the run's."""
    for d in ([member.parent] if member.parent != run else []) + [run]:
        f = d / "metrics.json"
        if f.is_file():
            agg = json.loads(f.read_text())
            if "classes" in agg and "counts" in agg:
                return agg
    raise WsiNcmiError(f"{run}: training has not finished (no metrics.json); finish it with `wsi-ncmi train ... --resume`")


def load_member_model(run: str | Path, member: str | Path, in_dim: int) -> RunModel:
    """The model of one trained member of a run: a seed folder (``seed_<s>``, or ``fold_<k>/seed_<s>``).

    Why one loader: ``evaluate``, ``heatmap`` and ``predict`` must score a slide exactly as
    training did, by the member's own ``scoring.pt``.
    """
    from wsi_ncmi.mil.models import create_mil_model

    from wsi_ncmi.train.runfolder import settings_folder

    run, member = Path(run), Path(member)
    if not (settings_folder(run) / "config.yaml").is_file():
        raise WsiNcmiError(f"{run}: not a training run folder (no config.yaml); pass the --out of `wsi-ncmi train`")
    cfg = saved_config(settings_folder(run) / "config.yaml")
    ckpt = member / "best.pt"
    if cfg.folds and member.parent == run and not run.name.startswith("fold_"):
        raise WsiNcmiError(f"{run}: a {cfg.folds}-fold cross-validation run, one model per fold; pass a fold folder "
                           f"such as {run / 'fold_0'}")
    if not ckpt.is_file():
        raise WsiNcmiError(f"{ckpt}: no checkpoint; train the run first (or pick --seed)")
    agg = _aggregate_record(run, member)
    classes = agg["classes"]
    st = load_checkpoint(ckpt)
    C = len(classes)
    model = create_mil_model(cfg.model, in_dim, C, dropout=cfg.dropout)
    load_state(model, st["model"], ckpt)
    objective = create_objective(cfg.loss, C, model.embed_dim, None, ncmi_space=cfg.ncmi_space,
                                 ncmi_centroids=cfg.ncmi_centroids, ncmi_temperature=cfg.ncmi_temperature,
                                 mi_window=cfg.mi_window, ncmi_centre=cfg.ncmi_centre,
                                 ncmi_separation=cfg.ncmi_separation)
    load_state(objective, st["objective"], ckpt)
    model.eval()
    objective.eval()
    priors = class_priors(agg["counts"]["train"], C, counts=True)
    sc = member / "scoring.pt"
    if not sc.is_file():            # runs from before scoring.pt: `evaluate` writes it under evaluate/
        root = settings_folder(run)
        alt = root / "evaluate" / member.relative_to(root) / "scoring.pt"
        sc = alt if alt.is_file() else sc
    if sc.is_file():
        scorer = Scorer.from_state(load_checkpoint(sc))
    elif objective.predicts_by_centroid:
        raise WsiNcmiError(f"{sc}: missing; rerun `wsi-ncmi evaluate {run}` to write it")
    else:                           # softmax runs written before scoring.pt was saved for every loss
        scorer = Scorer("softmax", includes_prior=cfg.loss not in PRIOR_FREE_LOSSES)
    return RunModel(cfg, classes, model, objective, priors, scorer)
