"""CLIP-ZSS pseudo-supervision: pseudo-classes in unannotated regions, and the library's old global term.

CLIP-ZSS (Chen, Deguchi, Zhang, Zheng, Murase, "CLIP Is Also a Good Teacher: A New Learning Framework
for Inductive Zero-shot Semantic Segmentation", arXiv 2310.02296, 2023), *Pixel Learning*: the frozen
CLIP teacher's dense tokens of each training image are clustered where the annotation says nothing
(background), and the clusters supervise the student as pseudo-classes, so the head learns to
separate things it has no names for instead of learning "everything unnamed is background".

Two pseudo-label makers are registered (config key ``pseudo_labels``):

- ``clip-zss`` (:func:`clip_zss_pseudo_labels`): the paper's recipe as far as its text describes it
  (no code is public; the formulas below are this library's reading, stated where it chooses):
  for every window size ``s`` of ``pseudo_scales`` the token grid is cut into ``s x s`` windows,
  the mean unit token of each window is one K-means *seed* (so the number of seeds follows the
  image, not a fixed K), cosine K-means runs from those seeds; the clusters of all scales are then
  fused by merging, most similar pair first, every two whose centroids' cosine exceeds
  ``pseudo_merge`` (the merged centroid is the direction of the two clusters' summed unit tokens),
  and at most ``pseudo_clusters`` survive. Each background token takes its nearest surviving
  centroid. The student-side prototypes and the synthesizer are in methods/clip_zss.py.
- ``kmeans`` (:func:`kmeans_pseudo_labels`): the library's earlier fixed-K variant on the run's own
  tokens (multi-scale *descriptors*: each token's unit feature averaged over ``s x s``
  neighbourhoods, concatenated; K = ``pseudo_clusters``), with an MLP :class:`Synthesizer` and the
  mean-pooled :func:`global_contrastive` term. Not the paper's; kept under its own name.

Both form clusters over tokens whose pixels are all background (label 0) and cut the pseudo masks
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


def background_tokens(target: Tensor, grid: tuple[int, int]) -> Tensor:
    """Labels ``b h w`` -> ``b (gh gw)``: True where every pixel under the token is background (0)."""
    background = (target == 0).float()[:, None]
    cell = F.adaptive_max_pool2d(1 - background, grid)[:, 0] == 0  # b gh gw: no non-background pixel
    return rearrange(cell, "b gh gw -> b (gh gw)")


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
    eligible = background_tokens(target, grid)
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


# -- CLIP-ZSS: window seeds, seeded cosine K-means, merging of similar clusters ---------------------
def window_seeds(units: Tensor, grid: tuple[int, int], eligible: Tensor, window: int) -> Tensor:
    """Unit tokens ``n c`` of one image, eligible ``n`` -> seeds ``m c``: the mean eligible unit
    token of each ``window x window`` cell of the grid (unit norm; cells with none are skipped)."""
    gh, gw = grid
    across = -(-gw // window)  # windows per row, the last one partial
    rows = torch.arange(gh, device=units.device).repeat_interleave(gw) // window
    cols = torch.arange(gw, device=units.device).repeat(gh) // window
    cell = (rows * across + cols)[eligible]
    cells = -(-gh // window) * across
    sums = units.new_zeros(cells, units.shape[1]).index_add_(0, cell, units[eligible])
    count = torch.bincount(cell, minlength=cells)
    return F.normalize(sums[count > 0], dim=-1)


def seeded_kmeans(units: Tensor, seeds: Tensor, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Cosine K-means of unit points ``n c`` from ``seeds`` ``k c`` -> (summed unit points per
    non-empty cluster ``m c``, sizes ``m``). Deterministic: the seeds are the only start."""
    centres = seeds
    for _ in range(iters):
        onehot = F.one_hot((units @ centres.T).argmax(-1), len(centres)).to(units.dtype)  # n k
        count = onehot.sum(0)
        centres = torch.where(count[:, None] > 0, F.normalize(onehot.T @ units, dim=-1), centres)
    onehot = F.one_hot((units @ centres.T).argmax(-1), len(centres)).to(units.dtype)
    count = onehot.sum(0)
    return (onehot.T @ units)[count > 0], count[count > 0]


def merge_similar(sums: Tensor, sizes: Tensor, threshold: float, most: int) -> Tensor:
    """Clusters as summed unit points ``m c`` (sizes ``m``) -> merged centroids ``m' c`` (unit).

    Agglomerative: while two centroids' cosine exceeds ``threshold``, or more than ``most``
    clusters remain, the most similar pair becomes one cluster (its points' sum, so the centroid
    is the size-weighted direction of the two).
    """
    sums, sizes = sums.clone(), sizes.clone()
    while len(sums) > 1:
        unit = F.normalize(sums, dim=-1)
        sim = (unit @ unit.T).fill_diagonal_(-float("inf"))
        best = int(sim.argmax())
        i, j = divmod(best, len(sums))
        if sim[i, j] <= threshold and len(sums) <= most:
            break
        sums[i], sizes[i] = sums[i] + sums[j], sizes[i] + sizes[j]
        keep = torch.arange(len(sums), device=sums.device) != j
        sums, sizes = sums[keep], sizes[keep]
    return F.normalize(sums, dim=-1)


@torch.no_grad()
def clip_zss_pseudo_labels(
    tokens: Tensor,
    grid: tuple[int, int],
    target: Tensor,
    *,
    clusters: int = 8,
    scales: Sequence[int] = (2, 4),
    merge: float = 0.85,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Teacher tokens ``b n c``, labels ``b h w`` -> (pseudo labels ``b h w``: ``0 .. m-1`` or -1,
    clusters per image ``b``). ``scales``: window sizes in tokens; ``clusters``: the most kept."""
    b = tokens.shape[0]
    units = F.normalize(tokens.float(), dim=-1)
    eligible = background_tokens(target, grid)
    ids = torch.full(eligible.shape, -1, dtype=torch.long, device=tokens.device)
    counts = torch.zeros(b, dtype=torch.long, device=tokens.device)
    for i in range(b):
        if int(eligible[i].sum()) < 2:
            continue
        points = units[i, eligible[i]]
        found = [seeded_kmeans(points, window_seeds(units[i], grid, eligible[i], s)) for s in scales]
        centres = merge_similar(
            torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found]), merge, clusters
        )
        assign = (points @ centres.T).argmax(-1)
        used = torch.bincount(assign, minlength=len(centres)) > 0
        ids[i, eligible[i]] = (torch.cumsum(used.long(), 0) - 1)[assign]  # empty ones dropped
        counts[i] = int(used.sum())
    labels = segment_map(ids, grid, tuple(target.shape[-2:]))
    return torch.where(target == 0, labels, torch.full_like(labels, -1)), counts


PSEUDO_LABELS["kmeans"] = kmeans_pseudo_labels
PSEUDO_LABELS["clip-zss"] = clip_zss_pseudo_labels
