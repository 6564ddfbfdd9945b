"""ZegFormer-style decoupled head (``method: zegformer``): group pixels first, name the groups after.

ZegFormer (Ding et al., "Decoupling Zero-Shot Semantic Segmentation", CVPR 2022) splits the task in
two: class-agnostic grouping (segments that need no names, so they transfer to unseen classes),
then zero-shot classification of each segment against the name embeddings. Here:

- grouping ``queries``: N learned mask queries read the patch tokens (cross-attention) and give N
  masks; they are trained on the seen masks *without their names* (each ground-truth region is
  matched to one query, Hungarian on dice, and supervised with BCE + dice); or grouping
  ``spectral``: the eigen-segments of fusioner/methods/spectral.py (training-free);
- classification: each segment's embedding is the mean of the projected patch features under its
  mask, scored against every name (cosine / temperature, an independent sigmoid per name); a pixel's
  segment-level probability is its segment memberships times their names' probabilities;
- ZegFormer's ensemble: the segment-level logits are blended with a pixel-level cosine score by
  ``zegformer_pixel_weight`` (0 = segments only, 1 = pixels only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange
from scipy.optimize import linear_sum_assignment
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.engine.losses import mask_loss
from fusioner.methods.layers import CrossBlock, cosine_maps, logit_scale, to_size
from fusioner.methods.registry import Method, register_method
from fusioner.methods.spectral import spectral_segments

GROUPINGS = ("queries", "spectral")


@dataclass(frozen=True)
class ZegFormerConfig:
    vision_dim: int
    text_dim: int
    dim: int = 256
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    temperature: float = 0.07
    learn_temperature: bool = False
    upsample: int = 4
    grouping: str = "queries"  # queries | spectral
    queries: int = 16  # mask queries, or spectral segments with grouping=spectral
    pixel_weight: float = 0.5  # the ensemble's share of the pixel-level score
    spectral_eigs: int = 4
    seed: int = 0


def _config(config: Any, vision: Any, text: Any) -> ZegFormerConfig:
    return ZegFormerConfig(
        vision_dim=vision.embed_dim,
        text_dim=text.embed_dim,
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        temperature=config.temperature,
        learn_temperature=config.learn_temperature,
        grouping=config.zegformer_grouping,
        queries=config.zegformer_queries,
        pixel_weight=config.zegformer_pixel_weight,
        spectral_eigs=config.spectral_eigs,
        seed=config.seed,
    )


def segment_scores(segments: Tensor, names: Tensor, scale: Tensor | float) -> Tensor:
    """Zero-shot classification: segment embeddings ``b s d``, names ``b k d`` -> logits ``b s k``."""
    return einsum(F.normalize(segments, dim=-1), F.normalize(names, dim=-1), "b s d, b k d -> b s k") * scale


def pool_segments(assign: Tensor, patches: Tensor) -> Tensor:
    """Soft memberships ``b s n`` (each pixel's sum to 1), features ``b n d`` -> segment means ``b s d``."""
    return einsum(assign, patches, "b s n, b n d -> b s d") / assign.sum(-1, keepdim=True).clamp(min=1e-6)


def pixels_from_segments(assign: Tensor, scores: Tensor) -> Tensor:
    """Memberships ``b s n``, segment logits ``b s k`` -> per-pixel logits ``b k n``.

    A pixel's probability for a name is the membership-weighted probability of its segments, each
    name on its own (sigmoid, not a softmax over names: names asked together never compete). Taken
    in log space, ``log p - log(1 - p)``: sigmoids of cosines over a temperature of 0.07 saturate,
    and clamped probabilities would tie the best names; a one-hot membership returns ``scores``.
    """
    log_a = rearrange(assign.clamp(min=1e-12).log(), "b s n -> b s 1 n")
    yes = torch.logsumexp(log_a + rearrange(F.logsigmoid(scores), "b s k -> b s k 1"), dim=1)
    no = torch.logsumexp(log_a + rearrange(F.logsigmoid(-scores), "b s k -> b s k 1"), dim=1)
    return yes - no  # b k n


class ZegFormerHead(nn.Module):
    """tokens ``b n cv``, names ``b k ct`` -> logits ``b k h w``; ``return_aux`` adds the masks."""

    def __init__(self, config: ZegFormerConfig) -> None:
        super().__init__()
        if config.grouping not in GROUPINGS:
            raise ValueError(
                f"zegformer grouping must be one of {', '.join(GROUPINGS)}, got {config.grouping!r}"
            )
        self.config = config
        d = config.dim
        self.visual_in = nn.Sequential(nn.LayerNorm(config.vision_dim), nn.Linear(config.vision_dim, d))
        self.patch_blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio, qkv_bias=True) for _ in range(config.depth)
        )
        self.dense = nn.Identity()
        self.text_in = nn.Linear(config.text_dim, d)
        if config.grouping == "queries":
            self.queries = nn.Parameter(torch.zeros(config.queries, d))
            nn.init.trunc_normal_(self.queries, std=0.02)
            self.query_blocks = nn.ModuleList(
                CrossBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth)
            )
            self.mask_embed = nn.Linear(d, d)
        scale = logit_scale(config.temperature, config.learn_temperature)
        if isinstance(scale, nn.Parameter):
            self.logit_scale = scale
        else:
            self.register_buffer("logit_scale", scale, persistent=False)

    @property
    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def group(self, tokens: Tensor, patches: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (memberships ``b s n``, mask logits ``b s n`` of learned queries or None)."""
        if self.config.grouping == "spectral":
            seg = spectral_segments(
                tokens.detach(),
                eigs=self.config.spectral_eigs,
                segments=self.config.queries,
                seed=self.config.seed,
            )
            return rearrange(F.one_hot(seg, self.config.queries).to(patches.dtype), "b n s -> b s n"), None
        q = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.query_blocks:
            q = block(q, patches)
        masks = einsum(self.mask_embed(q), patches, "b s d, b n d -> b s n") / patches.shape[-1] ** 0.5
        return masks.softmax(1), masks

    def forward(
        self,
        tokens: Tensor,
        grid: tuple[int, int],
        text: Tensor,
        size: tuple[int, int] | None = None,
        *,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if text.ndim == 2:
            text = text.expand(tokens.shape[0], -1, -1)
        patches = self.visual_in(tokens)
        for block in self.patch_blocks:
            patches = block(patches)
        patches = self.dense(patches)  # b n d
        names = self.text_in(text.to(patches.dtype))  # b k d
        assign, masks = self.group(tokens, patches)
        scores = segment_scores(pool_segments(assign, patches), names, self.scale)  # b s k
        segment_logits = rearrange(
            pixels_from_segments(assign, scores), "b k (gh gw) -> b k gh gw", gh=grid[0], gw=grid[1]
        )
        w = self.config.pixel_weight
        logits = segment_logits
        if w:
            logits = (1 - w) * segment_logits + w * cosine_maps(names, patches, grid) * self.scale
        logits = to_size(logits, grid, self.config.upsample, size)
        if not return_aux:
            return logits
        aux = (
            {}
            if masks is None
            else {"masks": rearrange(masks, "b s (gh gw) -> b s gh gw", gh=grid[0], gw=grid[1])}
        )
        return logits, aux

    def aux_loss(self, aux: dict[str, Tensor], target: Tensor, dice_weight: float = 1.0) -> Tensor:
        """Class-agnostic grouping loss: every seen region of ``target`` (``b h w``: 0 background,
        j + 1 = seen name j, -1 ignore) is matched to one mask query (Hungarian on dice) and
        supervised with BCE + dice; the names themselves are never used."""
        if "masks" not in aux:
            return target.new_zeros((), dtype=torch.float32)
        masks = F.interpolate(
            aux["masks"].float(), size=target.shape[-2:], mode="bilinear", align_corners=False
        )
        losses = []
        for one, labels in zip(masks, target, strict=True):
            regions = [r for r in labels.unique().tolist() if r > 0]
            if not regions:
                continue
            truth = torch.stack([labels == r for r in regions]).float()  # r h w
            with torch.no_grad():
                probs = one.sigmoid()
                inter = einsum(probs, truth, "s h w, r h w -> s r")
                dice = (2 * inter + 1) / (probs.sum((1, 2))[:, None] + truth.sum((1, 2))[None] + 1)
                rows, cols = linear_sum_assignment(-dice.cpu().numpy())
            picked = one[torch.as_tensor(rows, device=one.device)][None]  # 1 m h w
            valid = (labels >= 0)[None]
            losses.append(
                mask_loss(picked, truth[torch.as_tensor(cols, device=one.device)][None], valid, dice_weight)
            )
        return torch.stack(losses).mean() if losses else masks.sum() * 0


ZEGFORMER = register_method(
    Method(
        name="zegformer",
        config_cls=ZegFormerConfig,
        head_cls=ZegFormerHead,
        from_config=_config,
        dense_module="dense",
    )
)

__all__ = ["ZegFormerConfig", "ZegFormerHead", "pixels_from_segments", "pool_segments", "segment_scores"]
