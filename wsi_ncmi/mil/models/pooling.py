"""Mean- and max-pooling baselines: the floor any attention model must beat.

Used as MIL baselines since Wang et al. (2018), "Revisiting Multiple Instance Neural Networks",
Pattern Recognition, arXiv:1610.02501.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from wsi_ncmi.mil.models.base import MILModel, MILOutput, project


class PoolingMIL(MILModel):
    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.25, mode: str = "mean"):
        super().__init__()
        self.fc = project(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.mode = mode
        self.embed_dim = hidden

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        m = mask.unsqueeze(-1).to(h.dtype)
        if self.mode == "mean":
            z = (h * m).sum(1) / m.sum(1).clamp_min(1)
            att = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1)
        else:
            hm = h.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            z, arg = hm.max(1)
            att = torch.zeros(h.shape[:2], device=h.device)  # share of feature dims each instance wins
            att.scatter_add_(1, arg, torch.ones_like(arg, dtype=att.dtype))
            att = att / att.sum(1, keepdim=True)
        return MILOutput(self.classifier(z), z, att)


def MeanPoolMIL(in_dim, num_classes, **kw):
    return PoolingMIL(in_dim, num_classes, mode="mean", **kw)


def MaxPoolMIL(in_dim, num_classes, **kw):
    return PoolingMIL(in_dim, num_classes, mode="max", **kw)
