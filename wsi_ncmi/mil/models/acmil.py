"""ACMIL: attention-challenging MIL.

Zhang, Meng, Liu, Zhou, Han & Koh (2023), "Attention-Challenging Multiple Instance Learning for
Whole Slide Image Classification", ECCV 2024, arXiv:2311.07125.

Multiple Branch Attention (MBA): ``n_token`` gated-attention branches, each pooling the bag and
classified by its own head; a diversity penalty (mean pairwise cosine similarity of the branch
attention maps) keeps them on different instances. Stochastic Top-K Instance Masking (STKIM): in
training, each branch's ``top_k`` most attended instances are masked with probability
``mask_drop``, so the model cannot rely on a few salient patches. The slide prediction pools with
the branches' mean attention. aux = mean branch CE + diversity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ncmi.mil.models.base import GatedAttention, MILModel, MILOutput, masked_softmax, project


class ACMIL(MILModel):
    aux_weight = 1.0

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, attn_dim: int = 128, dropout: float = 0.25,
                 n_token: int = 5, top_k: int = 10, mask_drop: float = 0.6):
        super().__init__()
        self.fc = project(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, n_token)
        self.branch_classifiers = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(n_token))
        self.classifier = nn.Linear(hidden, num_classes)
        self.top_k, self.mask_drop, self.n_token = top_k, mask_drop, n_token
        self.embed_dim = hidden

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)
        raw = self.attention(h)                                        # (B, T, N)
        keep = None if mask is None else mask[:, None, :].expand_as(raw)
        if self.training and self.mask_drop > 0:
            n = raw.shape[-1]
            k = min(self.top_k, max(1, n - 1))
            scores = raw if keep is None else raw.masked_fill(~keep, float("-inf"))
            top = torch.topk(scores, k, dim=-1).indices
            drop = torch.rand(top.shape, device=raw.device) < self.mask_drop
            stk = torch.ones_like(raw, dtype=torch.bool)
            stk.scatter_(-1, top, ~drop)
            keep = stk if keep is None else keep & stk
        a = masked_softmax(raw, keep)                                   # (B, T, N)
        m = a @ h                                                       # (B, T, H)
        branch_logits = torch.stack([clf(m[:, t]) for t, clf in enumerate(self.branch_classifiers)], 1)
        a_bag = masked_softmax(raw.mean(1), mask)                       # (B, N)
        z = (a_bag.unsqueeze(1) @ h).squeeze(1)
        aux = None
        if y is not None and self.training:
            ce = F.cross_entropy(branch_logits.flatten(0, 1).float(), y.repeat_interleave(self.n_token))
            an = F.normalize(a.float(), dim=-1)
            sim = an @ an.transpose(1, 2)                               # (B, T, T)
            off = ~torch.eye(self.n_token, dtype=torch.bool, device=sim.device)
            aux = ce + sim[:, off].mean()
        return MILOutput(self.classifier(z), z, a_bag, aux)
