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


class InputNorm(nn.Module):
    """Per-dimension standardisation of instance features, (x - mean) / std, with training-split statistics.

    Why it lives in the model: the statistics are part of what was trained, so they travel in every
    checkpoint and ``evaluate``, ``heatmap`` and ``predict`` apply exactly what training applied. Empty
    buffers mean identity (``--feature-norm none``, and every checkpoint written before this existed).
    A dimension constant over the training split gets weight 0: the model never saw it vary.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("inv_std", torch.zeros(0))

    @property
    def active(self) -> bool:
        return self.mean.numel() > 0

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        dev = self.mean.device
        std = std.double()
        self.mean = mean.to(dev, torch.float32)
        self.inv_std = torch.where(std > 0, 1.0 / std.clamp_min(1e-12), torch.zeros_like(std)).to(dev, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return ((x.float() - self.mean) * self.inv_std).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mean, inv = state_dict.get(prefix + "mean"), state_dict.get(prefix + "inv_std")
        if (mean is None) != (inv is None) or (mean is not None and mean.shape != inv.shape):
            error_msgs.append(f"{prefix}mean and {prefix}inv_std must come together, of one shape")
            return
        if mean is None:                         # a checkpoint from before feature standardisation: identity
            mean, inv = torch.zeros(0), torch.zeros(0)
        dev = self.mean.device
        self.mean, self.inv_std = mean.detach().to(dev, torch.float32), inv.detach().to(dev, torch.float32)


def _normalise_input(module: "MILModel", args: tuple, kwargs: dict):
    """Forward pre-hook: standardise ``x``; padded rows (``mask`` False) stay exactly zero."""
    if module.input_norm.active:
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        x = module.input_norm(x)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0)
        if args:
            args = (x,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, "x": x}
    return args, kwargs


class MILModel(nn.Module):
    """Base of every aggregator: instance features pass ``input_norm`` (identity unless fitted) first."""

    aux_weight: float = 0.0
    embed_dim: int = 0

    def __init__(self):
        super().__init__()
        self.input_norm = InputNorm()
        self.register_forward_pre_hook(_normalise_input, with_kwargs=True)

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
