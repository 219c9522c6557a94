"""TransMIL: transformer-based correlated MIL.

Shao, Bian, Chen, Wang, Zhang, Ji & Zhang (2021), "TransMIL: Transformer based Correlated Multiple
Instance Learning for Whole Slide Image Classification", NeurIPS, arXiv:2106.00442.

Layout as in the paper: projection, class token, transformer layer, PPEG (multi-scale depthwise
convolutions over the instances laid on a square grid, padded by repeating the first instances),
transformer layer, LayerNorm, classifier on the class token. The paper approximates
self-attention with Nystrom attention to fit long bags in memory; here attention is exact,
through PyTorch's fused scaled-dot-product kernels (flash / memory-efficient on GPU), which fit the
same bags without the approximation. ``attention`` is the class token's attention to the
instances in the last layer, averaged over heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ncmi.mil.models.base import MILModel, MILOutput


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.drop = dropout

    def forward(self, x, key_mask=None, want_cls_attention=False):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.drop if self.training else 0.0)
        cls_att = None
        if want_cls_attention:
            s = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)   # (B, h, 1, n)
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            cls_att = s.float().softmax(-1).mean(1)[:, 0]                           # (B, n)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, d)), cls_att


class _PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.p7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.p5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.p3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, side: int):
        cls, feat = x[:, :1], x[:, 1:]
        g = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        g = g + self.p7(g) + self.p5(g) + self.p3(g)
        return torch.cat([cls, g.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = _Layer(hidden, heads, dropout)
        self.ppeg = _PPEG(hidden)
        self.layer2 = _Layer(hidden, heads, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.embed_dim = hidden

    def forward(self, x, mask=None, y=None) -> MILOutput:
        h = self.fc(x)
        b, n, _ = h.shape
        side = math.ceil(math.sqrt(n))
        add = side * side - n
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=h.device)
        if add:  # repeat the first instances to fill the square (the paper's padding)
            reps = math.ceil(add / n)
            h = torch.cat([h, h.repeat(1, reps, 1)[:, :add]], dim=1)
            mask = torch.cat([mask, mask.repeat(1, reps)[:, :add]], dim=1)
        h = torch.cat([self.cls_token.expand(b, -1, -1).to(h.dtype), h], dim=1)
        key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=h.device), mask], dim=1)
        h, _ = self.layer1(h, key_mask)
        h = self.ppeg(h, side)
        h, att = self.layer2(h, key_mask, want_cls_attention=True)
        z = self.norm(h)[:, 0]
        att = att[:, 1:n + 1]
        att = att / att.sum(1, keepdim=True).clamp_min(1e-12)
        return MILOutput(self.classifier(z), z, att)
