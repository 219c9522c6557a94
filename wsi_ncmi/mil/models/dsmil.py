"""DSMIL: dual-stream MIL with a critical-instance attention.

Li, Li & Eliceiri (2021), "Dual-stream Multiple Instance Learning Network for Whole Slide Image
Classification with Self-supervised Contrastive Learning", CVPR, arXiv:2011.08939.

Stream 1 scores every instance per class (max-pooling: the critical instance of each class).
Stream 2 attends from every instance to each class's critical instance (scaled dot product of
learned queries), pools values into one bag vector per class, and a 1-D convolution over those
gives the bag logits. Both streams are trained (loss = bag CE + max-instance CE, the paper's
equal weighting, hence ``aux_weight`` = 1). The bag logits are the output; ``attention`` is the
stream-2 attention of the predicted class.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ncmi.mil.models.base import MILModel, MILOutput, project


class DSMIL(MILModel):
    aux_weight = 1.0

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, q_dim: int = 128, dropout: float = 0.25):
        super().__init__()
        self.fc = project(in_dim, hidden, dropout)
        self.instance_classifier = nn.Linear(hidden, num_classes)
        self.q = nn.Sequential(nn.Linear(hidden, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
        self.fcc = nn.Conv1d(num_classes, num_classes, kernel_size=hidden)
        self.q_dim = q_dim
        self.embed_dim = hidden * num_classes

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)                                              # (B, N, H)
        c = self.instance_classifier(h)                             # (B, N, C)
        if mask is not None:
            c_for_max = c.masked_fill(~mask[..., None], float("-inf"))
        else:
            c_for_max = c
        max_pred, crit = c_for_max.max(1)                           # (B, C), (B, C)
        q = self.q(h)                                               # (B, N, Q)
        q_crit = torch.gather(q, 1, crit[..., None].expand(-1, -1, q.shape[-1]))   # (B, C, Q)
        s = q @ q_crit.transpose(1, 2) / math.sqrt(self.q_dim)      # (B, N, C)
        if mask is not None:
            s = s.masked_fill(~mask[..., None], float("-inf"))
        a = s.float().softmax(1).to(h.dtype)                        # over instances
        bag = a.transpose(1, 2) @ self.v(h)                         # (B, C, H)
        logits = self.fcc(bag).squeeze(-1)                          # (B, C)
        att = a.gather(2, logits.argmax(1)[:, None, None].expand(-1, a.shape[1], 1)).squeeze(-1)
        aux = F.cross_entropy(max_pred.float(), y) if (y is not None and self.training) else None
        return MILOutput(logits, bag.flatten(1), att, aux)
