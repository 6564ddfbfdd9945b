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
  eigenvector is arbitrary, so both halves are candidates): ``2K`` binary masks per image;
- per name, its thresholded prediction (``sigmoid > 0.5``) is compared with every eigen-mask; the
  best by IoU is swapped in when that IoU reaches ``min_iou`` (config key ``sazs_min_iou``): the
  name's logits keep their magnitude and take the eigen-mask's sign.

The graph is built on the run's own tokens, or on another frozen backbone's (``refine_vision``,
e.g. ``dino_vitb16`` as SAZS does). SAZS's training-time boundary / edge constraint is
methods/sazs_edges.py (``sazs_edge_weight``).

Like SAZS, the eigen-masks are precomputed per image when there is a feature cache: evaluation
(fusioner/engine/evaluate.py) computes each cached image's masks once, before scoring, and stores
them beside its cached tokens (fusioner/engine/refine_cache.py, bool ``2K gh gw``, in a folder keyed
by what the graph depends on: :meth:`SAZSRefiner.precompute_key`, i.e. ``spectral_eigs``,
``spectral_knn`` and the ``refine_vision`` backbone with its weights; other settings, other masks),
then serves them to the refiner (:meth:`SAZSRefiner.precomputed`) instead of solving again. Without a
cache (``predict`` on a user's image, sliding windows) the refiner solves on the fly, once per view:
inference asks once per chunk of names and :meth:`SAZSRefiner.graph_masks` keeps the last view's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
        # The last view's source (held, so that no later tensor can take its address), its version
        # and grid, and its masks; and the masks served by ``precomputed``.
        self._last: tuple[Tensor, int, tuple[int, int] | None, Tensor] | None = None
        self._given: Tensor | None = None

    def eigen_masks(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens ``b n c`` on ``grid`` -> their eigen-masks bool ``b 2K gh gw``, solved once per
        tokens tensor: inference asks once per chunk of names, with the same tokens."""
        return self._memo(tokens, grid, lambda: binary_eigen_masks(tokens, grid, self.eigs, self.knn))

    def _memo(self, source: Tensor, grid: tuple[int, int] | None, solve: Callable[[], Tensor]) -> Tensor:
        """``solve()``, or the masks last solved for this very ``source`` tensor, unmodified since."""
        last = self._last
        if last is None or last[0] is not source or last[1] != source._version or last[2] != grid:
            self._last = (source, source._version, grid, solve())
        return self._last[3]

    def graph_masks(self, tokens: Tensor, grid: tuple[int, int], image: Tensor | None = None) -> Tensor:
        """The view's eigen-masks bool ``b 2K gh gw`` on the graph's grid: of ``tokens`` (``b n c``
        on ``grid``), or of ``refine_vision``'s tokens of ``image`` (``b 3 s s``); the masks that
        :meth:`precomputed` serves, when it serves some."""
        if self._given is not None:
            return self._given
        if self.vision is None:
            return self.eigen_masks(tokens, grid)
        if image is None:
            raise FusionerError("refine_vision needs the image; this call passed tokens only")
        vision = self.vision

        def solve() -> Tensor:
            out = vision(image.to(next(vision.parameters()).device))
            return binary_eigen_masks(out.tokens.to(tokens.device), out.grid, self.eigs, self.knn)

        return self._memo(image, None, solve)  # the grid is refine_vision's own

    # What fusioner/engine/refine_cache.py stores per cached image, and how it hands it back.
    def precompute_key(self) -> dict[str, Any]:
        """What the eigen-masks depend on (``sazs_min_iou`` only decides their use)."""
        vision = self.vision
        return {
            "refine": "sazs",
            "spectral_eigs": self.eigs,
            "spectral_knn": self.knn,
            "refine_vision": self.vision_name,
            "refine_weights": vision.fingerprint() if vision is not None else "",
            "refine_preprocessing": vision.preprocessing if vision is not None else {},
        }

    @torch.no_grad()
    def precompute(self, tokens: Tensor, grid: tuple[int, int], image: Tensor | None = None) -> Tensor:
        """One view's eigen-masks bool ``2K gh gw`` (tokens ``1 n c``, image ``1 3 s s``), as
        :meth:`__call__` computes them."""
        return self.graph_masks(tokens, grid, image)[0]

    @contextmanager
    def precomputed(self, masks: Tensor) -> Iterator[None]:
        """Within: every view's eigen-masks are ``masks`` (bool ``2K gh gw``), nothing is solved."""
        self._given = masks[None]
        try:
            yield
        finally:
            self._given = None

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, tokens: Tensor, grid: tuple[int, int], image: Tensor | None = None
    ) -> Tensor:
        masks = self.graph_masks(tokens, grid, image).to(logits.device).float()
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
