"""Upsampling decoders: fused patch tokens on their grid -> per-pixel embeddings, by name.

``DECODERS`` (config key ``decoder``) holds three layouts:

- ``default``: three stages of conv3x3 + GroupNorm + ReLU, each followed by 2x bilinear
  upsampling, then a 1x1 conv. It halves the channels at every upsampling, never below
  ``score_dim``, and scores in the last width (the head maps class tokens to it): normalising and
  scoring ``d``-wide pixel features at 8x the grid costs more than the whole fusion transformer.
  ``score_dim=0`` lets the widths halve down to ``d/8`` (16 dims at d=128): cheap, but too few
  dimensions to rank tens of names against each other (benchmarks/QUALITY.md).
- ``released``: the decoder of the released Fusioner code (chaofanma/Fusioner, model/decoder.py):
  four stages of conv3x3 -> InstanceNorm (no affine, eps 1e-5) -> ReLU at ``d`` channels with a
  bilinear x2 between stages (grid -> 2x -> 4x -> 8x), a conv1x1, and then the *features* are
  resized to the output size before any scoring (``resizes_features``). At 128x128 this decoder
  alone costs more FLOPs than a ViT-L/14 forward.
- ``paper``: kept only so heads saved before issue 20 load and compute what they were trained with:
  the ``default`` stages at full width. It was *not* the released decoder (three GroupNorm stages,
  logits resized after scoring), so a new config may not ask for it (fusioner/config.py says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.config import register_choices

STAGES = 3
RELEASED_STAGES = 4
LAYOUTS = ("default", "released")  # what a new config may ask for
register_choices("decoder", LAYOUTS)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: training batches are small and evaluation runs one image at a time.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    # Token t sits at row t // gw, column t % gw (row-major), as every adapter and the released code.
    return rearrange(tokens, "b (gh gw) d -> b d gh gw", gh=grid[0], gw=grid[1])


class Decoder(nn.Module):
    """``default`` / ``paper``: GroupNorm stages; the head scores at 8x the grid, then resizes logits."""

    resizes_features = False

    def __init__(self, dim: int, layout: str = "default", score_dim: int = 0) -> None:
        super().__init__()
        if layout not in ("default", "paper"):
            raise ValueError(f"Decoder layout must be 'default' or 'paper', got {layout!r}")
        floor = min(max(score_dim, 16), dim)
        widths = [dim] + [dim if layout == "paper" else max(dim >> (i + 1), floor) for i in range(STAGES)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True))
            for cin, cout in zip(widths[:-1], widths[1:], strict=True)
        )
        self.out_dim = widths[-1]
        self.out = nn.Conv2d(widths[-1], self.out_dim, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None) -> Tensor:
        """tokens: ``b (gh gw) d`` -> pixel embeddings ``b out_dim (gh*8) (gw*8)`` (``size`` unused)."""
        x = _grid(tokens, grid)
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)


class ReleasedDecoder(nn.Module):
    """``released``: the released Fusioner decoder; features, not logits, reach the output size."""

    resizes_features = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        # The conv biases are cancelled by the InstanceNorm after them; they are kept so a released
        # state dict (which has them) loads strictly, key for key.
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.InstanceNorm2d(dim), nn.ReLU(inplace=True))
            for _ in range(RELEASED_STAGES)
        )
        self.out_dim = dim
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None) -> Tensor:
        """tokens ``b (gh gw) d`` -> features ``b d H W`` at ``size`` (default: 8x the grid)."""
        x = _grid(tokens, grid)
        gh, gw = grid
        for i, stage in enumerate(self.stages):
            if i:  # x2 between stages: grid -> 2x -> 4x -> 8x
                x = F.interpolate(x, size=(gh << i, gw << i), mode="bilinear", align_corners=False)
            x = stage(x)
        x = self.out(x)
        if size is None or tuple(size) == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


DECODERS: dict[str, Callable[[int, int], nn.Module]] = {
    "default": lambda dim, score_dim: Decoder(dim, "default", score_dim),
    "paper": lambda dim, score_dim: Decoder(dim, "paper", score_dim),
    "released": lambda dim, score_dim: ReleasedDecoder(dim),
}


def build_decoder(layout: str, dim: int, score_dim: int = 0) -> nn.Module:
    if layout not in DECODERS:
        raise ValueError(f"decoder layout must be one of {', '.join(DECODERS)}, got {layout!r}")
    return DECODERS[layout](dim, score_dim)
