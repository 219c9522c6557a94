"""CONCH v1.5: the vision tower of CONCH v1.5, TITAN's patch encoder (768-d embeddings).

CONCH: Lu et al. 2024, A visual-language foundation model for computational pathology, Nature
Medicine 30, 863-874 (arXiv:2307.12914). CONCH v1.5 is the ViT-L/16 image encoder of TITAN: Ding et
al. 2024, Multimodal whole slide foundation model for pathology, arXiv:2411.19666; weights
``pytorch_model_vision.bin`` in the gated hub repo ``MahmoodLab/conchv1_5``.

The module has the checkpoint's layout (so its file loads by name, strictly):

* ``trunk``: a timm ViT-L/16 (width 1024, 24 blocks, 16 heads, MLP ratio 4, qkv bias, LayerScale,
  final LayerNorm, class token, absolute position embeddings), run at 448 px (28 x 28 patches);
* ``attn_pool_contrast``: attentional pooling: one learned 768-d query (LayerNorm on the query and
  on the 1024-d tokens, bias-free projections, 8 heads) attends over all final tokens, class token
  included;
* ``ln_contrast``: LayerNorm of that pooled vector, which is the embedding (no projection, no
  L2 normalisation: the reference patch-feature extraction, TRIDENT's ``conch_v15``, takes it so).

Position embeddings: the reference tower is built for 224 px (a 14 x 14 grid) and interpolates the
grid to the input at every forward pass (bicubic, scale factor (28 + 0.1) / 14: DINO's offset that
keeps the output size from rounding down; Caron et al. 2021, arXiv:2104.14294). Here the same
interpolation runs once, when the weights are loaded (``adapt_state_dict``), into a trunk built for
448 px, which gives the same numbers. A checkpoint stored at another grid is first resized to
14 x 14 (bilinear), as the reference does; one already at 448 px (saved from this module) is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionalPooler(nn.Module):
    """``queries`` learned vectors attend over a token sequence (multi-head, bias-free projections)."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) -> (B, queries, dim)."""
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)

        def heads(t):  # (B, L, h*d) -> (B, h, L, d)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))   # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Tower(nn.Module):
    """ViT trunk -> attentional pooler -> LayerNorm (see the module docstring)."""

    def __init__(self, trunk: nn.Module, out_dim: int = 768, pool_heads: int = 8, base_img_size: int = 224):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(out_dim, trunk.embed_dim, pool_heads)
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.num_features = out_dim
        self.num_prefix_tokens = getattr(trunk, "num_prefix_tokens", 1)
        self.base_grid = base_img_size // trunk.patch_embed.patch_size[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])

    def adapt_state_dict(self, sd: dict) -> dict:
        """The checkpoint's position embeddings interpolated to this trunk's grid (see above)."""
        key = "trunk.pos_embed"
        pe = sd.get(key)
        target = self.trunk.pos_embed
        if pe is None or tuple(pe.shape) == tuple(target.shape):
            return sd
        grid = tuple(self.trunk.patch_embed.grid_size)
        return dict(sd, **{key: interpolate_pos_embed(pe, grid, self.base_grid, self.num_prefix_tokens)})


def interpolate_pos_embed(pe: torch.Tensor, grid: tuple[int, int], base: int, prefix: int = 1) -> torch.Tensor:
    """(1, prefix + g*g, C) position embeddings -> (1, prefix + grid[0]*grid[1], C), via a base x base grid."""
    pe = pe.float()
    cls_pe, patch_pe = pe[:, :prefix], pe[:, prefix:]
    g = math.isqrt(patch_pe.shape[1])
    if g * g != patch_pe.shape[1]:
        raise ValueError(f"position embeddings of {patch_pe.shape[1]} patches are not a square grid")
    c = patch_pe.shape[-1]
    img = patch_pe.reshape(1, g, g, c).permute(0, 3, 1, 2)
    if g != base:
        img = F.interpolate(img, size=(base, base), mode="bilinear", align_corners=False, antialias=False)
    if tuple(grid) != (base, base):
        scale = ((grid[0] + 0.1) / base, (grid[1] + 0.1) / base)
        img = F.interpolate(img, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(img.shape[-2:]) != tuple(grid):
            raise ValueError(f"position-embedding grid {tuple(img.shape[-2:])} != {tuple(grid)}")
    return torch.cat([cls_pe, img.permute(0, 2, 3, 1).reshape(1, -1, c)], dim=1)


def build_conch_v15(spec) -> ConchV15Tower:
    """The architecture of ``spec`` with random weights (``spec.arch_kwargs``: timm kwargs plus
    ``out_dim``, ``pool_heads`` and ``base_img_size``)."""
    import timm

    kw = dict(spec.arch_kwargs)
    out_dim = kw.pop("out_dim", 768)
    pool_heads = kw.pop("pool_heads", 8)
    base_img_size = kw.pop("base_img_size", 224)
    kw.setdefault("num_classes", 0)
    trunk = timm.create_model(spec.arch, pretrained=False, **kw)
    return ConchV15Tower(trunk, out_dim, pool_heads, base_img_size)
