"""CLAM: clustering-constrained attention MIL, single- (SB) and multi-branch (MB).

Lu, Williamson, Chen, Chen, Barbieri & Mahmood (2021), "Data-efficient and weakly supervised
computational pathology on whole-slide images", Nature Biomedical Engineering, arXiv:2004.09666.

Gated attention pools the bag (MB: one attention branch and one scalar classifier per class).
The instance-level clustering loss: for the true class, the ``k`` most attended instances are
pseudo-labelled positive and the ``k`` least attended negative; for every other class (subtyping,
the multi-class setting here) the ``k`` most attended are pseudo-labelled negative. Per-class
instance classifiers are trained on those with cross-entropy (the paper's default is a smooth
top-1 SVM; CE is its documented alternative). Total loss = 0.7 bag + 0.3 instance, i.e.
``aux_weight`` = 0.3 / 0.7 relative to the bag loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ncmi.mil.models.base import GatedAttention, MILModel, MILOutput, masked_softmax, project


class CLAM(MILModel):
    aux_weight = 0.3 / 0.7

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25,
                 k_sample: int = 8, multi_branch: bool = False):
        super().__init__()
        self.c = num_classes
        self.mb = multi_branch
        self.fc = project(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, num_classes if multi_branch else 1, dropout)
        if multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_classes))
        else:
            self.classifier = nn.Linear(hidden, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(num_classes))
        self.k = k_sample
        self.embed_dim = hidden * (num_classes if multi_branch else 1)

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)                                               # (B, N, H)
        raw = self.attention(h)                                      # (B, heads, N)
        a = masked_softmax(raw, None if mask is None else mask[:, None, :])
        m = a @ h                                                    # (B, heads, H)
        if self.mb:
            logits = torch.cat([clf(m[:, k]) for k, clf in enumerate(self.classifiers)], dim=1)
            z = m.flatten(1)
        else:
            logits = self.classifier(m[:, 0])
            z = m[:, 0]
        pred = logits.argmax(1)
        att = a[torch.arange(len(a)), pred if self.mb else 0]       # attention of the predicted branch
        aux = self._instance_loss(h, a, mask, y) if (y is not None and self.training) else None
        return MILOutput(logits, z, att, aux)

    def _instance_loss(self, h, a, mask, y) -> torch.Tensor:
        losses = []
        for b in range(h.shape[0]):
            n = int(mask[b].sum()) if mask is not None else h.shape[1]
            k = max(1, min(self.k, n // 2))
            hb = h[b, :n]
            for c in range(self.c):
                ab = a[b, c if self.mb else 0, :n]
                top = torch.topk(ab, k).indices
                clf = self.instance_classifiers[c]
                if c == int(y[b]):
                    bottom = torch.topk(-ab, k).indices
                    inst = torch.cat([hb[top], hb[bottom]])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                else:
                    inst, target = hb[top], torch.zeros(k, dtype=torch.long, device=h.device)
                losses.append(F.cross_entropy(clf(inst).float(), target))
        return torch.stack(losses).mean()


def CLAM_SB(in_dim, num_classes, **kw):
    return CLAM(in_dim, num_classes, multi_branch=False, **kw)


def CLAM_MB(in_dim, num_classes, **kw):
    return CLAM(in_dim, num_classes, multi_branch=True, **kw)
