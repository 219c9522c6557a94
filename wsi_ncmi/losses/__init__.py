"""Training objectives for classifiers: the CE family, the information-theoretic family and NCMI.

``create_objective(name, num_classes, ...)`` returns an ``Objective`` that turns model outputs into
the training loss (and, for losses with learned centroids, the centroid-step loss) and says how
the trained model predicts. One file per loss:

* ``classic``: ce, weighted_ce, focal, label_smoothing;
* ``pc_softmax``: probability-corrected softmax (Qin et al.);
* ``mi``: mutual-information learned classifier (Yi et al.);
* ``cmi_ce``: CE + CMI penalty (CMIC-DL, Yang et al.), on NCMI's terms and centroid scheme;
* ``ncmi``: the NCMI loss (Ye et al.) and its parts (``nsf``, ``ncmi_value``, ``fit_temperature``...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.losses.classic import CrossEntropy, FocalLoss, inverse_frequency_weights
from wsi_ncmi.losses.cmi_ce import CMIPenalty
from wsi_ncmi.losses.mi import MutualInformationLoss
from wsi_ncmi.losses.ncmi import NCMILoss, fit_temperature, kl_matrix, ncmi_value, nsf
from wsi_ncmi.losses.pc_softmax import PCSoftmaxLoss, class_priors

LOSSES = ("ce", "weighted_ce", "focal", "label_smoothing", "pc_softmax", "mi", "cmi_ce", "ncmi", "ce+ncmi")


class Objective(nn.Module):
    """One loss, with what it needs to score: centroids for ``ncmi``, softmax for the rest.

    ``ce+ncmi`` adds ``ncmi_weight`` x NCMI to CE and predicts with the CE head; ``ncmi`` predicts
    from its training class means (the nearest mean, or the Bayes score over them:
    ``train/scoring.py``). ``cmi_ce`` and ``ncmi`` own learnable centroids
    (``centroid_module``), stepped by their own optimizer after each network step.
    """

    def __init__(self, name: str, num_classes: int, embed_dim: int, train_labels=None, focal_gamma: float = 2.0,
                 label_smoothing: float = 0.1, ncmi_space: str = "embedding", ncmi_centroids: str = "alternating",
                 ncmi_temperature: float | None = None, ncmi_weight: float = 1.0, mi_weight: float = 1.0,
                 mi_window: int = 64, cmi_lambda: float = 0.5, cmi_beta: float = 0.1,
                 ncmi_separation: str = "harmonic", ncmi_centre: str = "none"):
        super().__init__()
        if name not in LOSSES:
            raise WsiNcmiError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
        self.name = name
        self.num_classes = num_classes
        self.ncmi_weight = ncmi_weight
        labels = train_labels if train_labels is not None else list(range(num_classes))
        weight = inverse_frequency_weights(labels, num_classes) if name == "weighted_ce" else None
        self.base = {"ce": CrossEntropy(), "weighted_ce": CrossEntropy(weight), "ce+ncmi": CrossEntropy(),
                     "cmi_ce": CrossEntropy(), "label_smoothing": CrossEntropy(label_smoothing=label_smoothing),
                     "focal": FocalLoss(focal_gamma), "pc_softmax": PCSoftmaxLoss(class_priors(labels, num_classes)),
                     "mi": MutualInformationLoss(num_classes, mi_weight, mi_window)}.get(name)
        self.ncmi = NCMILoss(num_classes, embed_dim, ncmi_space, ncmi_temperature, ncmi_centroids,
                             separation=ncmi_separation, centre=ncmi_centre) \
            if "ncmi" in name else None
        self.cmi = CMIPenalty(num_classes, cmi_lambda, cmi_beta) if name == "cmi_ce" else None

    @property
    def predicts_by_centroid(self) -> bool:
        return self.name == "ncmi"

    @property
    def centroid_module(self) -> nn.Module | None:
        """The module whose centroids take an alternating step, or None."""
        m = self.ncmi if self.ncmi is not None else self.cmi
        return m if m is not None and m.alternating else None

    @property
    def alternating(self) -> bool:
        return self.centroid_module is not None

    def distribution(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The output distribution P the NCMI diagnostics are computed on."""
        if self.ncmi is not None:
            return self.ncmi.distribution(logits, embedding)
        return torch.softmax(logits.float(), dim=-1)

    def network_loss(self, logits, embedding, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss for the network step, P for the centroid step or None)."""
        if self.cmi is not None:
            p = torch.softmax(logits.float(), dim=-1)
            return self.base(logits, y) + self.cmi(p, y, "network"), p
        if self.ncmi is None:
            return self.base(logits, y), None
        p = self.ncmi.distribution(logits, embedding)
        loss = self.ncmi(p, y, "network")
        if self.base is not None:
            loss = self.base(logits, y) + self.ncmi_weight * loss
        return loss, p

    def centroid_loss(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.centroid_module(p, y, "centroid")

    def centroid_parameters(self) -> list[nn.Parameter]:
        return [self.centroid_module.centroid_logits] if self.alternating else []

    def network_parameters(self):
        return [p for n, p in self.named_parameters() if not n.endswith("centroid_logits")]


def create_objective(name: str, num_classes: int, embed_dim: int, train_labels=None, **kwargs) -> Objective:
    return Objective(name, num_classes, embed_dim, train_labels, **kwargs)


__all__ = ["LOSSES", "NCMILoss", "Objective", "create_objective", "fit_temperature", "kl_matrix", "ncmi_value", "nsf"]
