"""Cross-entropy family baselines.

* ``ce``: cross-entropy, optionally class-weighted by inverse training frequency (CAMELYON-17's
  slide classes are 318/36/59/87, so unweighted CE tends to ignore ITC). The weighted loss is the
  plain mean of w_y * CE over the batch, not PyTorch's sum(w * CE) / sum(w): with one bag per step
  (the MIL default) that normalisation divides the weight out and weighted CE silently equals CE.
  The weights average to 1 over the training split, so the loss scale stays that of CE.
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
        if not self.weight.numel():
            return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        loss = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.label_smoothing)
        return (loss * self.weight[y]).mean()


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
            loss = loss * self.weight[y]        # batch mean, as in CrossEntropy (see the module docstring)
        return loss.mean()


def inverse_frequency_weights(labels, num_classes: int) -> torch.Tensor:
    """w_k = N / (C n_k): balances the classes and averages to 1 over the training labels."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)
