"""Upsampling decoder: fused patch tokens on their grid -> per-pixel embeddings at 8x the grid.

Three stages of conv3x3 + GroupNorm + ReLU, each followed by 2x bilinear upsampling, then a 1x1
conv to ``out_dim``: the width of the space where pixels meet class tokens for the cosine logits.

``default`` halves the channels at every upsampling, never below ``score_dim``, and scores in the
last width (the head maps class tokens to it): normalising and scoring ``d``-wide pixel features
at 8x the grid costs more than the whole fusion transformer. ``score_dim=0`` lets the widths halve
down to ``d/8`` (16 dims at d=128): cheap, but too few dimensions to rank tens of names against
each other (benchmarks/QUALITY.md). ``paper`` keeps the full width at every stage and scores in
``d`` dimensions as the released Fusioner code did; at 128x128 that decoder alone costs more FLOPs
than a ViT-L/14 forward.
"""

from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

STAGES = 3
LAYOUTS = ("default", "paper")


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: training batches are small and evaluation runs one image at a time.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Decoder(nn.Module):
    def __init__(self, dim: int, layout: str = "default", score_dim: int = 0) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"decoder layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        floor = min(max(score_dim, 16), dim)
        widths = [dim] + [dim if layout == "paper" else max(dim >> (i + 1), floor) for i in range(STAGES)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True))
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.out_dim = widths[-1]
        self.out = nn.Conv2d(widths[-1], self.out_dim, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens: ``b (gh gw) d`` -> pixel embeddings ``b out_dim (gh*8) (gw*8)``."""
        x = rearrange(tokens, "b (gh gw) d -> b d gh gw", gh=grid[0], gw=grid[1])
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)
