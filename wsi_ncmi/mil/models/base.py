"""The interface every aggregator implements.

``forward(x, mask=None, y=None) -> MILOutput`` with ``x`` (B, N, D) instance features and ``mask``
(B, N) True for real instances (None: all real; batches of bags of different sizes are padded).
``MILOutput`` exposes what the losses and the pictures need: the class ``logits``, the bag
``embedding`` (what embedding-space NCMI acts on), the normalised instance ``attention`` (B, N)
and the model's own auxiliary loss (CLAM's instance loss, ACMIL's branch losses...), weighted by
the model's ``aux_weight`` in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class MILOutput:
    logits: torch.Tensor
    embedding: torch.Tensor
    attention: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MILModel(nn.Module):
    aux_weight: float = 0.0
    embed_dim: int = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, y: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over instances, padded positions (mask False) getting exactly zero weight."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=dim).to(scores.dtype)


def expand_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(B, N) -> broadcastable over extra head dims of ``like`` (B, H, N)."""
    if mask is None:
        return None
    return mask[:, None, :].expand(-1, like.shape[1], -1)


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018): w^T (tanh(V h) * sigmoid(U h)), one row per head."""

    def __init__(self, dim: int, attn_dim: int = 128, heads: int = 1, dropout: float = 0.0, gated: bool = True):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(attn_dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.v(h)
        if self.u is not None:
            a = a * self.u(h)
        return self.w(a).transpose(1, 2)  # (B, heads, N) raw scores


def project(in_dim: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
