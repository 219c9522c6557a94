"""Cross-entropy with a conditional-mutual-information penalty (CMIC-DL).

Yang, Hamidi, Ye, Tan & Yang (2025), "Conditional Mutual Information Constrained Deep Learning for
Classification", IEEE TNNLS 36(8), arXiv:2309.09123.

    loss = CE  +  lambda * concentration  -  beta * separation

on the softmax output P, with concentration KL(P || Q_y) and separation mean_{k != y} KL(Q_k || P)
computed by the same ``ncmi_terms`` as NCMI. The class centroids Q_k = softmax(w_k) are learned by
the same alternating scheme: the network step sees them fixed, the centroid step minimises the
concentration alone with P fixed, whose minimiser is the class-conditional mean E[P | Y = k] that
CMIC-DL's closed-form centroid update computes. Separation is bounded because ``kl_matrix`` clamps
probabilities at 1e-8, so the -beta term cannot run away once CE has pushed P to a vertex.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wsi_ncmi.losses.ncmi import ncmi_terms


class CMIPenalty(nn.Module):
    alternating = True

    def __init__(self, num_classes: int, lam: float = 0.5, beta: float = 0.1, init_scale: float = 5.0):
        super().__init__()
        self.lam, self.beta = lam, beta
        self.centroid_logits = nn.Parameter(init_scale * torch.eye(num_classes))

    def centroids(self) -> torch.Tensor:
        return torch.softmax(self.centroid_logits, dim=-1)

    def forward(self, p: torch.Tensor, y: torch.Tensor, step: str = "network") -> torch.Tensor:
        if step == "network":
            conc, sep = ncmi_terms(p, self.centroids().detach(), y)
            return self.lam * conc.mean() - self.beta * sep.mean()
        if step == "centroid":
            return ncmi_terms(p.detach(), self.centroids(), y)[0].mean()
        raise ValueError(f"step must be 'network' or 'centroid', not {step!r}")
