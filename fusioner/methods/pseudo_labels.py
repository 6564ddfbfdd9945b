"""CLIP-ZSS-style pseudo-supervision: K-means pseudo-classes in unannotated regions, and a global term.

CLIP-ZSS (Chen, Deguchi, Zhang, Zheng, Murase, "CLIP Is Also a Good Teacher: A New Learning Framework
for Inductive Zero-shot Semantic Segmentation", arXiv 2310.02296, 2023) trains on what the annotation
leaves out. *Pixel Learning*: multi-scale K-means over the
frozen dense tokens of each training image marks clusters in background / unannotated regions;
they supervise the model as pseudo-classes, whose "names" are the cluster means mapped into the
text space by a small synthesizer, so the head learns to separate things it has no names for
(instead of learning "everything unnamed is background"). *Global Learning*: a contrastive term
pulling each image's pooled dense features toward its own CLS token and away from the other images'.

Multi-scale here: each token's descriptor concatenates its unit feature averaged over an ``s x s``
window for every ``s`` of ``scales`` (config key ``pseudo_scales``, default 1 and 3: the token
itself and its 3 x 3 neighbourhood), so one K-means sees fine and coarse context at once. The number
of clusters is fixed (``pseudo_clusters``): CLIP-ZSS's window seeds and merging of similar clusters
are not here, nor are its CLIP teacher (the clusters are of the run's own frozen tokens) and its
CLS-query attention pooling (the global term pools the head's dense features by their mean);
clusters form over tokens whose pixels are all background (label 0), and the pseudo masks are cut
to the background pixels at full resolution: a pseudo-class never covers an annotated or ignored pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.methods.registry import PSEUDO_LABELS
from fusioner.methods.spectral import kmeans, segment_map


def multiscale_descriptors(tokens: Tensor, grid: tuple[int, int], scales: Sequence[int]) -> Tensor:
    """tokens ``b n c`` -> ``b n (c * len(scales))``: unit features averaged over ``s x s`` windows."""
    x = rearrange(F.normalize(tokens.float(), dim=-1), "b (gh gw) c -> b c gh gw", gh=grid[0], gw=grid[1])
    parts = []
    for s in scales:
        pooled = x if s == 1 else F.avg_pool2d(x, s, stride=1, padding=s // 2, count_include_pad=False)
        pooled = pooled[..., : grid[0], : grid[1]]  # even windows pad one row / column too many
        parts.append(F.normalize(pooled, dim=1))
    return rearrange(torch.cat(parts, dim=1), "b c gh gw -> b (gh gw) c")


@torch.no_grad()
def kmeans_pseudo_labels(
    tokens: Tensor,
    grid: tuple[int, int],
    target: Tensor,
    *,
    clusters: int = 4,
    scales: Sequence[int] = (1, 3),
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Frozen tokens ``b n c`` and labels ``b h w`` (0 background, > 0 annotated, < 0 ignore) ->
    (pseudo labels ``b h w``: cluster ``0 .. clusters-1`` or -1, prototypes ``b clusters c``).

    A prototype is the mean frozen token of its cluster (zeros for a cluster left empty).
    """
    b, n, c = tokens.shape
    # A token is eligible when every pixel under it is background: the min and max of its cell.
    background = (target == 0).float()[:, None]
    cell = F.adaptive_max_pool2d(1 - background, grid)[:, 0] == 0  # b gh gw: no non-background pixel
    eligible = rearrange(cell, "b gh gw -> b (gh gw)")
    desc = multiscale_descriptors(tokens, grid, scales)
    ids = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
    protos = tokens.new_zeros(b, clusters, c, dtype=torch.float32)
    for i in range(b):
        where = eligible[i].nonzero().view(-1)
        if where.numel() < 2:
            continue
        assign, _ = kmeans(desc[i, where], clusters, seed=seed + i)
        ids[i, where] = assign
        onehot = F.one_hot(assign, clusters).float()  # m k
        protos[i] = (onehot.T @ tokens[i, where].float()) / onehot.sum(0)[:, None].clamp(min=1)
    labels = segment_map(ids, grid, tuple(target.shape[-2:]))
    return torch.where(target == 0, labels, torch.full_like(labels, -1)), protos


class Synthesizer(nn.Module):
    """Cluster prototypes (vision width) -> pseudo "name" embeddings in the text space (unit norm)."""

    def __init__(self, vision_dim: int, text_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, text_dim)
        )

    def forward(self, prototypes: Tensor) -> Tensor:
        return F.normalize(self.net(prototypes), dim=-1)


def global_contrastive(pooled: Tensor, cls: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE over the batch: image i's pooled dense features ``b c`` should match its own CLS
    token ``b c`` (same width; the caller projects) and no other image's."""
    logits = F.normalize(pooled.float(), dim=-1) @ F.normalize(cls.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


PSEUDO_LABELS["kmeans"] = kmeans_pseudo_labels
