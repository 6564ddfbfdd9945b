"""Spectral segments of the frozen patch tokens, and a refiner that pulls mask logits toward them.

SAZS (Liu et al., "Delving into Shape-aware Zero-shot Semantic Segmentation", CVPR 2023; official
code Liuxinyv/SAZS) builds on the Laplacian eigenvectors of a self-supervised backbone's patch
affinities (the deep-spectral-segmentation recipe); this module shares that graph and its
eigenvectors (:func:`affinity`, :func:`laplacian_eigenvectors`) but is not SAZS (SAZS's eigen-mask
swap, label-free, is methods/sazs.py; its boundary constraint methods/sazs_edges.py). What is
here, training-free and for any method: an affinity graph over the patch tokens (cosine, negative
affinities cut, optionally only each token's ``knn`` nearest neighbours kept), the first ``eigs``
eigenvectors of its normalised Laplacian, K-means (seeded, in torch) over their row-normalised
entries (Ng-Jordan-Weiss spectral clustering) into ``segments`` segments; every segment takes the
mean probability of its pixels, blended with the raw probabilities by ``weight`` (see :func:`blend`
for why not logits). The refiner runs inside ``fusioner/inference.py``'s one path, so evaluation,
``predict`` and ``FusionerModel.logits`` all see it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import einsum, rearrange, repeat
from torch import Tensor
from torch.nn import functional as F

from fusioner.adapters.base import VisionAdapter
from fusioner.errors import FusionerError
from fusioner.methods.registry import register_refiner

# Keys of a Config (and of a saved model's ``refine`` record) that make a spectral refiner.
SETTINGS = ("refine_weight", "spectral_eigs", "spectral_segments", "spectral_knn", "refine_vision", "seed")


def affinity(tokens: Tensor, knn: int = 0) -> Tensor:
    """tokens ``b n c`` -> symmetric non-negative affinities ``b n n`` (cosine, negatives cut).

    Deep spectral methods keep only positive correlations: a negative cosine says "different", not
    "weakly the same", and would make the Laplacian indefinite. ``knn > 0`` keeps each token's
    ``knn`` strongest links (made symmetric), which sharpens segments on noisy tokens.
    """
    unit = F.normalize(tokens.float(), dim=-1)
    w = einsum(unit, unit, "b n c, b m c -> b n m").clamp(min=0)
    if 0 < knn < w.shape[-1]:
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(knn, dim=-1).indices, True)
        w = torch.where(keep | keep.transpose(1, 2), w, torch.zeros_like(w))
    return w


def laplacian_eigenvectors(w: Tensor, eigs: int) -> Tensor:
    """Affinities ``b n n`` -> the ``eigs`` eigenvectors of the smallest eigenvalues of the
    normalised Laplacian ``I - D^-1/2 W D^-1/2``, as ``b n eigs``."""
    d = w.sum(-1).clamp(min=1e-8).rsqrt()  # b n
    eye = torch.eye(w.shape[-1], device=w.device, dtype=w.dtype)
    lap = eye - d[:, :, None] * w * d[:, None, :]
    # float64: near-equal eigenvalues (one per well separated region) make float32 vectors mix.
    _, vectors = torch.linalg.eigh(lap.double())
    return vectors[..., :eigs].to(w.dtype)


def kmeans(x: Tensor, k: int, *, seed: int = 0, iters: int = 20) -> tuple[Tensor, Tensor]:
    """Points ``n d`` -> (assignment ``n`` in ``[0, k)``, centres ``k d``); k-means++ seeded by ``seed``.

    Deterministic for a seed (its own generator, no global state). ``k`` is capped at ``n``.
    """
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=gen).item()]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(-1).values.pow(2).cpu()
        if float(dist.sum()) <= 0:  # fewer distinct points than k: repeat one, it stays empty
            centres.append(centres[-1])
            continue
        centres.append(x[torch.multinomial(dist / dist.sum(), 1, generator=gen).item()])
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)
        onehot = F.one_hot(assign, k).to(x.dtype)  # n k
        count = onehot.sum(0)
        moved = einsum(onehot, x, "n k, n d -> k d") / count.clamp(min=1)[:, None]
        c = torch.where(count[:, None] > 0, moved, c)  # an empty cluster keeps its centre
    return assign, c


def spectral_segments(
    tokens: Tensor, *, eigs: int = 4, segments: int = 4, knn: int = 0, seed: int = 0
) -> Tensor:
    """Patch tokens ``b n c`` -> segment id per token ``b n`` (``0 .. segments-1``)."""
    vectors = laplacian_eigenvectors(affinity(tokens, knn), eigs)  # b n e
    rows = F.normalize(vectors, dim=-1)  # Ng-Jordan-Weiss: cluster directions, not magnitudes
    return torch.stack([kmeans(one, segments, seed=seed)[0] for one in rows])


def segment_map(seg: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Segment ids ``b n`` on a ``gh gw`` grid -> ``b h w`` at ``size`` (nearest: ids are labels)."""
    ids = rearrange(seg, "b (gh gw) -> b 1 gh gw", gh=grid[0], gw=grid[1]).float()
    return F.interpolate(ids, size=size, mode="nearest-exact")[:, 0].long()


def segment_means(scores: Tensor, seg: Tensor, segments: int) -> Tensor:
    """scores ``b k h w``, segment ids ``b h w`` -> each pixel's segment mean score ``b k h w``."""
    onehot = rearrange(F.one_hot(seg, segments).to(scores.dtype), "b h w s -> b s (h w)")
    total = einsum(rearrange(scores, "b k h w -> b k (h w)"), onehot, "b k p, b s p -> b k s")
    means = total / onehot.sum(-1)[:, None].clamp(min=1)  # b k s
    index = repeat(seg, "b h w -> b k (h w)", k=scores.shape[1])
    return means.gather(-1, index).view_as(scores)


def blend(logits: Tensor, seg: Tensor, segments: int, weight: float) -> Tensor:
    """``(1 - weight) * p + weight * (p's segment mean)`` with ``p = sigmoid(logits)``, returned as
    logits; weight 0 returns ``logits`` itself.

    The blend is in probability space, not logit space: a head's logits are lopsided (about -12 on
    background, +7 on the object), so a segment that is one fifth garment has a mean logit far
    below zero, and a logit-space blend erased every small garment on CCP (1-way unseen mIoU 0.40
    -> 0.02 on val with 16 segments, benchmarks/QUALITY.md). In probability space that segment's
    mean is 0.2, and a pixel the head is sure of stays above the threshold for weights up to 0.5.
    """
    if weight == 0:
        return logits
    probs = logits.float().sigmoid()
    mixed = (1 - weight) * probs + weight * segment_means(probs, seg, segments)
    return torch.logit(mixed, eps=1e-6)


class SpectralRefiner:
    """logits ``b k h w`` + the tokens they came from -> logits pulled to the eigen-segments.

    ``vision``: another frozen adapter (e.g. a DINO ViT, config key ``refine_vision``) whose tokens
    of the same (square, fixed-size) image build the graph instead of the run's own tokens.
    """

    def __init__(
        self,
        weight: float = 0.2,
        eigs: int = 4,
        segments: int = 16,
        knn: int = 0,
        seed: int = 0,
        vision: Any | None = None,
        vision_name: str = "",
    ) -> None:
        if not 0 <= weight <= 1:
            raise FusionerError(f"config key 'refine_weight': expected 0 to 1, got {weight!r}")
        if eigs < 1 or segments < 1:
            raise FusionerError(
                "config keys 'spectral_eigs' / 'spectral_segments': expected at least 1, "
                f"got {eigs} / {segments}"
            )
        self.weight, self.eigs, self.segments, self.knn, self.seed = weight, eigs, segments, knn, seed
        self.vision, self.vision_name = vision, vision_name

    def segments_of(self, tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        seg = spectral_segments(tokens, eigs=self.eigs, segments=self.segments, knn=self.knn, seed=self.seed)
        return segment_map(seg, grid, size)

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, tokens: Tensor, grid: tuple[int, int], image: Tensor | None = None
    ) -> Tensor:
        """logits ``b k h w``, tokens ``b n c`` on ``grid``; ``image`` ``b 3 s s`` for ``vision``."""
        if self.weight == 0:
            return logits
        if self.vision is not None:
            if image is None:
                raise FusionerError("refine_vision needs the image; this call passed tokens only")
            out = self.vision(image.to(next(self.vision.parameters()).device))
            tokens, grid = out.tokens.to(logits.device), out.grid
        seg = self.segments_of(tokens, grid, tuple(logits.shape[-2:]))
        return blend(logits, seg, self.segments, self.weight).to(logits.dtype)

    def record(self) -> dict[str, Any]:
        """What ``config.json`` keeps to rebuild this refiner (``build_refiner`` reads it back)."""
        return {
            "refine": "spectral",
            "refine_weight": self.weight,
            "spectral_eigs": self.eigs,
            "spectral_segments": self.segments,
            "spectral_knn": self.knn,
            "refine_vision": self.vision_name,
            "seed": self.seed,
        }


@register_refiner("none")
def _no_refiner(settings: Mapping[str, Any]) -> None:
    return None


def refine_backbone(settings: Mapping[str, Any]) -> VisionAdapter | None:
    """The frozen adapter named by ``refine_vision`` whose tokens build the graph, or None: the run's own."""
    name = settings.get("refine_vision") or ""
    if not name:
        return None
    from fusioner.adapters import create_vision

    return create_vision(name)


@register_refiner("spectral")
def build_spectral(settings: Mapping[str, Any]) -> SpectralRefiner:
    vision = refine_backbone(settings)
    return SpectralRefiner(
        weight=float(settings.get("refine_weight", 0.2)),
        eigs=int(settings.get("spectral_eigs", 4)),
        segments=int(settings.get("spectral_segments", 16)),
        knn=int(settings.get("spectral_knn", 0)),
        seed=int(settings.get("seed", 0)),
        vision=vision,
        vision_name=settings.get("refine_vision") or "",
    )


def eigen_segment_consistency(
    logits: Tensor, tokens: Tensor, grid: tuple[int, int], refiner: SpectralRefiner
) -> Tensor:
    """This library's own training term (``spectral_weight``), not SAZS's (SAZS trains a boundary /
    edge constraint): each name's probabilities are pulled toward their own mean over the K-means
    eigen-segment (the target is detached), so predicted masks stop cutting through regions the
    frozen features call one object."""
    with torch.no_grad():
        seg = refiner.segments_of(tokens.detach(), grid, tuple(logits.shape[-2:]))
    probs = logits.float().sigmoid()
    target = segment_means(probs.detach(), seg, refiner.segments)
    return (probs - target).pow(2).mean()
