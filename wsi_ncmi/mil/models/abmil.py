"""Gated attention-based MIL.

Ilse, Tomczak & Welling (2018), "Attention-based Deep Multiple Instance Learning", ICML,
arXiv:1802.04712. The bag embedding is the attention-weighted mean of projected instances.
"""

from __future__ import annotations

import torch.nn as nn

from wsi_ncmi.mil.models.base import GatedAttention, MILModel, MILOutput, masked_softmax, project


class ABMIL(MILModel):
    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, attn_dim: int = 128, dropout: float = 0.25,
                 gated: bool = True):
        super().__init__()
        self.fc = project(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, 1, 0.0, gated)
        self.classifier = nn.Linear(hidden, num_classes)
        self.embed_dim = hidden

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)
        a = masked_softmax(self.attention(h)[:, 0], mask)       # (B, N)
        z = (a.unsqueeze(1) @ h).squeeze(1)                     # (B, H)
        return MILOutput(self.classifier(z), z, a)
