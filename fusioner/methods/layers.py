"""Small layers the method heads share: a query-reads-patches block and cosine scoring."""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange
from timm.layers import Mlp
from torch import Tensor, nn
from torch.nn import functional as F


class CrossBlock(nn.Module):
    """Pre-norm block where queries read the patches (cross-attention) and then an MLP.

    No query reads another query: a name's mask then never depends on which other names were asked
    with it, so ``fusioner/inference.py`` may score names in chunks without changing a number.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: Tensor, patches: Tensor) -> Tensor:
        """queries ``b q d``, patches ``b n d`` -> queries ``b q d``."""
        kv = self.norm_kv(patches)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


def cosine_maps(queries: Tensor, patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """queries ``b k d``, patches ``b (gh gw) d`` -> cosines ``b k gh gw``."""
    scores = einsum(F.normalize(queries, dim=-1), F.normalize(patches, dim=-1), "b k d, b n d -> b k n")
    return rearrange(scores, "b k (gh gw) -> b k gh gw", gh=grid[0], gw=grid[1])


def logit_scale(temperature: float, learn: bool) -> Tensor | nn.Parameter:
    """log(1 / temperature), as the Fusioner head and CLIP keep it."""
    scale = torch.tensor(math.log(1 / temperature))
    return nn.Parameter(scale) if learn else scale


def to_size(logits: Tensor, grid: tuple[int, int], upsample: int, size: tuple[int, int] | None) -> Tensor:
    """Patch-level logits ``b k gh gw`` -> ``size`` if given, else ``upsample`` x the grid.

    The loss is taken at the returned resolution: at the bare grid (20 x 20 on CCP) a mask loses
    every thin garment, so heads scoring per patch hand the loss an upsampled map.
    """
    target = size if size is not None else (grid[0] * upsample, grid[1] * upsample)
    if tuple(target) == tuple(grid):
        return logits
    return F.interpolate(logits, size=tuple(target), mode="bilinear", align_corners=False)
