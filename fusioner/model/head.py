"""FusionHead: the only trainable part. Patch tokens + class embeddings -> per-class mask logits.

project -> fusion transformer (``joint`` | ``decoupled``, model/fusion.py) -> decoder
(model/decoder.py) -> cosine between each pixel and each class token, over a temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.model.decoder import Decoder
from fusioner.model.fusion import FUSIONS


@dataclass(frozen=True)
class HeadConfig:
    vision_dim: int
    text_dim: int
    dim: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    decoder: str = "default"
    temperature: float = 0.07
    # Defaults below are the behaviour of heads saved before these keys existed.
    fusion_attention: str = "decoupled"
    score_dim: int = 0
    learn_temperature: bool = False

    @classmethod
    def from_config(cls, config: Any, vision_dim: int, text_dim: int) -> HeadConfig:
        """The head a :class:`fusioner.config.Config` asks for, between backbones of these widths."""
        return cls(
            vision_dim=vision_dim,
            text_dim=text_dim,
            dim=config.dim,
            depth=config.depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            decoder=config.decoder,
            temperature=config.temperature,
            fusion_attention=config.fusion_attention,
            score_dim=config.score_dim,
            learn_temperature=config.learn_temperature,
        )


class FusionHead(nn.Module):
    """Patch tokens + class embeddings -> per-class mask logits."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if config.fusion_attention not in FUSIONS:
            raise ValueError(
                f"fusion_attention must be one of {', '.join(FUSIONS)}, got {config.fusion_attention!r}"
            )
        self.config = config
        self.decoder = Decoder(config.dim, config.decoder, config.score_dim)
        self.fusion = FUSIONS[config.fusion_attention](
            config.vision_dim,
            config.text_dim,
            config.dim,
            config.depth,
            config.heads,
            config.mlp_ratio,
            class_dim=self.decoder.out_dim,
        )
        # log(1 / temperature), as CLIP's logit_scale. Fixed, it is a non-persistent buffer: heads
        # saved before the option existed hold no such key and still load strictly.
        scale = torch.tensor(math.log(1 / config.temperature))
        if config.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale, persistent=False)

    @property
    def scale(self) -> Tensor:
        # CLIP's cap (100): beyond it a learned scale makes training unstable.
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(
        self, tokens: Tensor, grid: tuple[int, int], text: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        """tokens ``b n cv``, text ``b k ct`` (or ``k ct``, shared) -> logits ``b k h w``.

        ``h w`` is ``size`` when given, else the decoder's own resolution (8x the grid), for callers
        that resize the logits themselves (resizing twice would cost more than the head).
        """
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        visual, classes = self.fusion(tokens, text.to(tokens.dtype))  # b q n d, b k d
        b, q = visual.shape[:2]
        pixels = self.decoder(rearrange(visual, "b q n d -> (b q) n d"), grid)
        pixels = F.normalize(rearrange(pixels, "(b q) d h w -> b q d h w", b=b), dim=2)
        classes = F.normalize(classes, dim=-1)
        if q == 1:  # decoupled: one pixel embedding shared by every name
            logits = einsum(pixels[:, 0], classes, "b d h w, b k d -> b k h w")
        else:  # joint: each name scored against the patches it conditioned
            logits = einsum(pixels, classes, "b k d h w, b k d -> b k h w")
        logits = logits * self.scale
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
