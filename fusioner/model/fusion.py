"""Joint transformer over visual patch tokens and class-name tokens.

Visual and class tokens are projected to a shared width ``d`` and concatenated into one sequence
``[n visual ; k class]``; every block attends jointly over both groups, which is what lets a class
token gather evidence from the patches it names (and the patches learn which names are present).
All K class names of a query go through in one pass.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class JointFusion(nn.Module):
    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        dim: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        class_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.visual_in = nn.Sequential(
            nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim), nn.LayerNorm(dim)
        )
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        # One learned vector marks every class token as "a name", the only cue the blocks get
        # to tell the two groups apart besides their content.
        self.class_embed = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        # timm's pre-norm Block runs attention through F.scaled_dot_product_attention (flash on GPUs).
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.visual_out = nn.Linear(dim, dim)
        self.class_out = nn.Linear(dim, class_dim or dim)

    def forward(self, tokens: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens: ``b n cv``; text: ``b k ct`` -> (visual ``b n d``, classes ``b k class_dim``)."""
        n = tokens.shape[1]
        x = torch.cat([self.visual_in(tokens), self.text_in(text) + self.class_embed], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.visual_out(x[:, :n]), self.class_out(x[:, n:])
