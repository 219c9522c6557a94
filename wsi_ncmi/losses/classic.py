"""Cross-entropy family baselines.

* ``ce``: cross-entropy, optionally class-weighted by inverse training frequency (CAMELYON-17's
  slide classes are 318/36/59/87, so unweighted CE tends to ignore ITC).
* ``label_smoothing``: CE against (1 - s) one-hot + s / C (Szegedy et al. 2016, "Rethinking the
  Inception Architecture", arXiv:1512.00567).
* ``focal``: (1 - p_y)^gamma-weighted CE (Lin et al. 2017, "Focal Loss for Dense Object
  Detection", arXiv:1708.02002).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossEntropy(nn.Module):
    alternating = False

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else torch.zeros(0))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.numel() else None
        return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    alternating = False

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else torch.zeros(0))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight.numel():
            w = self.weight[y]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def inverse_frequency_weights(labels, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)
