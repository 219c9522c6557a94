"""Training objectives for classifiers: CE family and NCMI (usable outside MIL).

``create_objective(name, num_classes, ...)`` returns an ``Objective`` that turns model outputs into
the training loss (and, for NCMI, the centroid-step loss) and into class scores and predictions.
The NCMI pieces themselves live in ``wsi_ncmi.losses.ncmi`` (``nsf``, ``NCMILoss``, ``ncmi_value``...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.losses.classic import CrossEntropy, FocalLoss, inverse_frequency_weights
from wsi_ncmi.losses.ncmi import NCMILoss, fit_temperature, kl_matrix, ncmi_value, nsf

LOSSES = ("ce", "weighted_ce", "focal", "label_smoothing", "ncmi", "ce+ncmi")


class Objective(nn.Module):
    """One loss, with what it needs to score: centroids for ``ncmi``, softmax for the rest.

    ``ce+ncmi`` adds ``ncmi_weight`` x NCMI to CE (the CMIC-DL idea with NCMI's ratio) and predicts
    with the CE head; ``ncmi`` predicts by nearest class-mean centroid.
    """

    def __init__(self, name: str, num_classes: int, embed_dim: int, train_labels=None, focal_gamma: float = 2.0,
                 label_smoothing: float = 0.1, ncmi_space: str = "logit", ncmi_centroids: str = "alternating",
                 ncmi_temperature: float | None = None, ncmi_weight: float = 1.0):
        super().__init__()
        if name not in LOSSES:
            raise WsiNcmiError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
        self.name = name
        self.num_classes = num_classes
        self.ncmi_weight = ncmi_weight
        weight = inverse_frequency_weights(train_labels, num_classes) if name == "weighted_ce" else None
        self.base = {"ce": CrossEntropy(), "weighted_ce": CrossEntropy(weight), "ce+ncmi": CrossEntropy(),
                     "label_smoothing": CrossEntropy(label_smoothing=label_smoothing),
                     "focal": FocalLoss(focal_gamma)}.get(name)
        self.ncmi = NCMILoss(num_classes, embed_dim, ncmi_space, ncmi_temperature, ncmi_centroids) \
            if "ncmi" in name else None

    @property
    def predicts_by_centroid(self) -> bool:
        return self.name == "ncmi"

    @property
    def alternating(self) -> bool:
        return self.ncmi is not None and self.ncmi.alternating

    def distribution(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The output distribution P the NCMI diagnostics are computed on."""
        if self.ncmi is not None:
            return self.ncmi.distribution(logits, embedding)
        return torch.softmax(logits.float(), dim=-1)

    def network_loss(self, logits, embedding, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss for the network step, P for the centroid step or None)."""
        if self.ncmi is None:
            return self.base(logits, y), None
        p = self.ncmi.distribution(logits, embedding)
        loss = self.ncmi(p, y, "network")
        if self.base is not None:
            loss = self.base(logits, y) + self.ncmi_weight * loss
        return loss, p

    def centroid_loss(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ncmi(p, y, "centroid")

    def network_parameters(self):
        return [p for n, p in self.named_parameters() if not n.endswith("centroid_logits")]


def create_objective(name: str, num_classes: int, embed_dim: int, train_labels=None, **kwargs) -> Objective:
    return Objective(name, num_classes, embed_dim, train_labels, **kwargs)


__all__ = ["LOSSES", "NCMILoss", "Objective", "create_objective", "fit_temperature", "kl_matrix", "ncmi_value", "nsf"]
