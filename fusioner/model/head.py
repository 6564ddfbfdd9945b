"""FusionHead: the only trainable part. Patch tokens + class embeddings -> per-class mask logits.

(optional L2 normalisation of the tokens) -> project -> fusion transformer (``joint`` |
``decoupled``, model/fusion.py) -> decoder (model/decoder.py) -> cosine between each pixel and each
class token, over a temperature. The released Fusioner head is one configuration of it
(``RELEASED``; fusioner/model/released.py loads its checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.model.decoder import build_decoder
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
    fusion_layout: str = "default"  # default | released (model/fusion.py FUSION_LAYOUTS)
    # L2-normalise each patch token over its channels before the fusion, as the released FullModel
    # does. Done here, in the head, so tokens read from the feature cache get it as well.
    normalize_tokens: bool = False

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
            fusion_layout=config.fusion_layout,
            normalize_tokens=config.normalize_tokens,
        )


# The released Fusioner head (chaofanma/Fusioner: Fusion -> Decoder -> Head, one name per pass,
# tokens L2-normalised by FullModel), as HeadConfig settings: what configs/pascal5i, configs/coco20i
# and configs/sweeps/paper.yaml set, and what head_from_released builds.
RELEASED: dict[str, Any] = {
    "fusion_attention": "joint",
    "decoder": "released",
    "fusion_layout": "released",
    "normalize_tokens": True,
    "mlp_ratio": 4.0,
    "temperature": 0.07,
    "learn_temperature": False,
    "score_dim": 0,
}


class FusionHead(nn.Module):
    """Patch tokens + class embeddings -> per-class mask logits."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if config.fusion_attention not in FUSIONS:
            raise ValueError(
                f"fusion_attention must be one of {', '.join(FUSIONS)}, got {config.fusion_attention!r}"
            )
        self.config = config
        self.decoder = build_decoder(config.decoder, config.dim, config.score_dim)
        self.fusion = FUSIONS[config.fusion_attention](
            config.vision_dim,
            config.text_dim,
            config.dim,
            config.depth,
            config.heads,
            config.mlp_ratio,
            class_dim=self.decoder.out_dim,
            layout=config.fusion_layout,
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

    @property
    def resizes_features(self) -> bool:
        """True when ``size`` resizes the decoder's features before scoring (``decoder: released``):
        callers that want the released numbers at an output size must pass ``size`` to the head,
        not resize the logits themselves."""
        return bool(getattr(self.decoder, "resizes_features", False))

    def forward(
        self, tokens: Tensor, grid: tuple[int, int], text: Tensor, size: tuple[int, int] | None = None
    ) -> Tensor:
        """tokens ``b n cv``, text ``b k ct`` (or ``k ct``, shared) -> logits ``b k h w``.

        ``h w`` is ``size`` when given, else the decoder's own resolution (8x the grid), for callers
        that resize the logits themselves (resizing twice would cost more than the head). With a
        decoder that resizes features (``released``) the features reach ``size`` before scoring.
        """
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        if self.config.normalize_tokens:
            tokens = F.normalize(tokens, dim=-1)
        visual, classes = self.fusion(tokens, text.to(tokens.dtype))  # b q n d, b k d
        # The logit scale goes on the k class vectors, not on k full-size maps of logits.
        classes = F.normalize(classes, dim=-1) * self.scale
        if size is not None and self.resizes_features:
            size = (int(size[0]), int(size[1]))
            if visual.shape[1] == 1 or torch.compiler.is_exporting():
                # An exported graph keeps the name count dynamic: a loop over it would fix it.
                return self._cosines(visual, classes, grid, size)
            # Joint: one name's patch set at a time, since k full-size d-wide feature maps at once
            # would not fit (64 names at 480 x 480, d = 512: 30 GB).
            parts = [
                self._cosines(visual[:, i : i + 1], classes[:, i : i + 1], grid, size)
                for i in range(visual.shape[1])
            ]
            return torch.cat(parts, dim=1)
        logits = self._cosines(visual, classes, grid, None)
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _cosines(
        self, visual: Tensor, classes: Tensor, grid: tuple[int, int], size: tuple[int, int] | None
    ) -> Tensor:
        """Fused patches ``b q n d``, scaled unit class tokens ``b k d`` -> scaled cosines ``b k h w``."""
        b, q = visual.shape[:2]
        pixels = self.decoder(rearrange(visual, "b q n d -> (b q) n d"), grid, size)
        pixels = rearrange(pixels, "(b q) d h w -> b q d h w", b=b)
        # F.normalize's numbers (eps 1e-12 on the norm) at half the cost of its forward and backward
        # on full-resolution maps, about 15% of a small head's training step.
        pixels = pixels * pixels.square().sum(2, keepdim=True).clamp_min(1e-24).rsqrt()
        if q == 1:  # decoupled (or a single name): one pixel embedding shared by every name
            return einsum(pixels[:, 0], classes, "b d h w, b k d -> b k h w")
        # joint: each name scored against the patches it conditioned
        return einsum(pixels, classes, "b k d h w, b k d -> b k h w")
