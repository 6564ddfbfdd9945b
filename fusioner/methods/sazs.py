"""SAZS's eigen-mask swap at inference (``refine: sazs``), label-free.

SAZS (Liu et al., "Delving into Shape-aware Zero-shot Semantic Segmentation", CVPR 2023; official
code Liuxinyv/SAZS, ``pascal_vit.py`` ``test_sp``) precomputes, per image, the first K = 5 Laplacian
eigenvectors of a self-supervised ViT's patch affinities (the deep-spectral-segmentation recipe) as
binary masks, and at test time replaces the model's mask by the eigen-mask that fits best. The
official ``test_sp`` picks that mask, and decides whether to swap, by IoU with the *ground truth*:
its published numbers are an upper bound no deployed model reaches. Here the choice uses nothing but
the model's own output:

- eigen-masks: eigenvectors 1 .. K of the normalised Laplacian of the graph (methods/spectral.py;
  eigenvector 0 is constant on a connected graph), each cut at 0 into its two halves (the sign of an
  eigenvector is arbitrary, so both halves are candidates): ``2K`` binary masks per image, computed
  once per image (:meth:`SAZSRefiner.eigen_masks` keeps the last image's);
- per name, its thresholded prediction (``sigmoid > 0.5``) is compared with every eigen-mask; the
  best by IoU is swapped in when that IoU reaches ``min_iou`` (config key ``sazs_min_iou``): the
  name's logits keep their magnitude and take the eigen-mask's sign.

The graph is built on the run's own tokens, or on another frozen backbone's (``refine_vision``,
e.g. ``dino_vitb16`` as SAZS does). SAZS's training-time boundary / edge constraint is
methods/sazs_edges.py (``sazs_edge_weight``). The eigenvectors are computed at inference and kept for
the last image only; SAZS precomputes them offline per image (not done here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor
from torch.nn import functional as F

from fusioner.errors import FusionerError
from fusioner.methods.registry import register_refiner
from fusioner.methods.spectral import affinity, laplacian_eigenvectors, refine_backbone

EIGENVECTORS = 5  # K of the released evaluation


def binary_eigen_masks(
    tokens: Tensor, grid: tuple[int, int], eigs: int = EIGENVECTORS, knn: int = 0
) -> Tensor:
    """Tokens ``b n c`` -> bool ``b (2 eigs) gh gw``: eigenvectors 1 .. eigs, each ``> 0`` and ``< 0``."""
    vectors = laplacian_eigenvectors(affinity(tokens, knn), eigs + 1)[..., 1:]  # b n e
    halves = torch.cat([vectors > 0, vectors < 0], dim=-1)  # b n 2e
    return rearrange(halves, "b (gh gw) m -> b m gh gw", gh=grid[0], gw=grid[1])


def mask_iou(pred: Tensor, masks: Tensor) -> Tensor:
    """Bool ``b k h w`` and bool ``b m h w`` -> IoU ``b k m`` (0 where both are empty)."""
    p, m = pred.flatten(2).float(), masks.flatten(2).float()
    inter = p @ m.transpose(1, 2)
    union = p.sum(-1)[..., None] + m.sum(-1)[:, None] - inter
    return inter / union.clamp(min=1)


def swap_in(logits: Tensor, masks: Tensor, min_iou: float, threshold: float = 0.5) -> Tensor:
    """Logits ``b k h w``, eigen-masks bool ``b m h w`` (same size) -> logits with, per name, the best
    matching eigen-mask's sign where its IoU with the thresholded prediction is ``>= min_iou``."""
    pred = logits.float().sigmoid() > threshold
    iou = mask_iou(pred, masks)  # b k m
    best, index = iou.max(-1)  # b k
    chosen = torch.gather(masks, 1, index[..., None, None].expand(-1, -1, *masks.shape[-2:]))  # b k h w
    swapped = torch.where(chosen, logits.abs(), -logits.abs())
    return torch.where((best >= min_iou)[..., None, None], swapped, logits)


class SAZSRefiner:
    """logits ``b k h w`` + the tokens they came from -> logits with eigen-masks swapped in."""

    def __init__(
        self,
        min_iou: float = 0.5,
        eigs: int = EIGENVECTORS,
        knn: int = 0,
        vision: Any | None = None,
        vision_name: str = "",
    ) -> None:
        if not 0 <= min_iou <= 1:
            raise FusionerError(f"config key 'sazs_min_iou': expected 0 to 1, got {min_iou!r}")
        if eigs < 1:
            raise FusionerError(f"config key 'spectral_eigs': expected at least 1, got {eigs}")
        self.min_iou, self.eigs, self.knn = min_iou, eigs, knn
        self.vision, self.vision_name = vision, vision_name
        self._last: tuple[tuple[Any, ...], Tensor] | None = None

    def eigen_masks(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """The image's eigen-masks on its grid, computed once per image: inference asks for them
        once per chunk of names, with the same tokens."""
        key = (tokens.data_ptr(), tuple(tokens.shape), tokens._version, grid)
        if self._last is None or self._last[0] != key:
            self._last = (key, binary_eigen_masks(tokens, grid, self.eigs, self.knn))
        return self._last[1]

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, tokens: Tensor, grid: tuple[int, int], image: Tensor | None = None
    ) -> Tensor:
        if self.vision is not None:
            if image is None:
                raise FusionerError("refine_vision needs the image; this call passed tokens only")
            out = self.vision(image.to(next(self.vision.parameters()).device))
            tokens, grid = out.tokens.to(logits.device), out.grid
        masks = self.eigen_masks(tokens, grid).float()
        masks = F.interpolate(masks, size=logits.shape[-2:], mode="nearest-exact").bool()
        return swap_in(logits, masks, self.min_iou).to(logits.dtype)

    def record(self) -> dict[str, Any]:
        """What ``config.json`` keeps to rebuild this refiner (``build_refiner`` reads it back)."""
        return {
            "refine": "sazs",
            "sazs_min_iou": self.min_iou,
            "spectral_eigs": self.eigs,
            "spectral_knn": self.knn,
            "refine_vision": self.vision_name,
        }


@register_refiner("sazs")
def build_sazs(settings: Mapping[str, Any]) -> SAZSRefiner:
    vision = refine_backbone(settings)
    return SAZSRefiner(
        min_iou=float(settings.get("sazs_min_iou", 0.5)),
        eigs=int(settings.get("spectral_eigs", EIGENVECTORS)),
        knn=int(settings.get("spectral_knn", 0)),
        vision=vision,
        vision_name=settings.get("refine_vision") or "",
    )


__all__ = ["SAZSRefiner", "binary_eigen_masks", "mask_iou", "swap_in"]
