"""SAZS's boundary / edge training constraint (config key ``sazs_edge_weight``).

SAZS (Liu et al., CVPR 2023; official code Liuxinyv/SAZS) trains its segmenter with an edge branch
and ``utils.py`` ``JointEdgeSegLoss``: the segmentation loss, plus

- ``0.3 x`` a class-balanced BCE between the edge branch's logits and the ground-truth edges
  (``bce2d``: edge pixels weighted by the share of non-edge pixels and the other way round, the mean
  over all pixels) -- :func:`balanced_edge_bce`;
- ``0.1 x`` an *edge attention* term: the segmentation cross-entropy only on pixels whose edge
  logit exceeds 0.8 (``edge_attention``; the official code compares the raw logit, not its
  sigmoid, and so does this), with image-based class weights ``1 + (1 - share)`` for the classes
  present in the batch, summed over images (``ImageBasedCrossEntropyLoss2d``) --
  :func:`edge_attention_loss`;
- ``0.3 x`` InverseForm's boundary distance (``InverseTransform2D``, ``inv_weight``) between the
  edge branch's output and the ground-truth edges, read by InverseForm's separately trained, frozen
  regressor (``distance_measures_regressor.pth``; methods/inverseform.py) -- when config key
  ``inverseform_weights`` names that file (no weights ship with this library; without it, the two
  terms above only). As the official code, the prediction side is ``log_softmax`` over the channel
  axis of the edge logits (``F.log_softmax(edgein)``, whose implicit axis is 1 for ``b c h w``) and
  the target side the ground-truth edge map (0 / 1, at the edge branch's size). SAZS's edge branch
  has one channel, so that log-softmax is 0 everywhere: the official term is the regressor's
  distance from an all-zero map to the ground-truth edges, a value that moves with the labels but
  sends no gradient to the model. This code keeps that rule (:func:`inverseform_input`), so it
  reproduces SAZS's loss; it adds no training signal.

The ground-truth edges (``fewshot_data/data/pascal.py`` ``onehot_to_binary_edges``, radius 2): a
pixel is an edge when, for some class of the label map, it lies within Euclidean distance 2 of
that class's boundary, on either side; the image border counts as a boundary of the classes that
touch it (the official map is padded with "no class"). Classes absent from the image add nothing
(scipy's distance transform of an all-ones map marks the top-left corner; that artefact is not
copied). Ignored pixels (< 0) belong to no class, as 255 does there.

Here the edge branch is :class:`EdgeHead`, a 1 x 1 linear map on the head's dense features (SAZS
puts it on its DPT decoder), trained with the objective and not saved with the model. The weight
``sazs_edge_weight`` scales SAZS's terms together (1 = SAZS's 0.3, 0.1 and, with
``inverseform_weights``, 0.3). Official files followed: Liuxinyv/SAZS ``utils.py`` (JointEdgeSegLoss,
InverseTransform2D), ``model/InverseForm.py`` (InverseNet), ``train.py`` (the edge branch's one
channel, edge targets at its size), ``fewshot_data/data/pascal.py`` (the edges).
"""

from __future__ import annotations

import torch
from einops import reduce
from torch import Tensor, nn
from torch.nn import functional as F

from fusioner.errors import FusionerError
from fusioner.methods.inverseform import InverseNet, inverseform_distance
from fusioner.model.losses import resize_labels

# JointEdgeSegLoss's edge_weight, att_weight and inv_weight
EDGE_WEIGHT, ATTENTION_WEIGHT, INVERSE_WEIGHT = 0.3, 0.1, 0.3


def _disk(radius: int, device: torch.device) -> Tensor:
    """Bool ``(2r+1) (2r+1)``: the offsets within Euclidean distance ``radius`` (centre excluded)."""
    r = torch.arange(-radius, radius + 1, device=device)
    disk = (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
    disk[radius, radius] = False
    return disk


def _dilate(x: Tensor, disk: Tensor, outside: bool) -> Tensor:
    """Bool ``b h w`` -> whether any pixel within the disk is set (beyond the image: ``outside``)."""
    r = disk.shape[0] // 2
    padded = F.pad(x.float()[:, None], (r, r, r, r), value=float(outside))
    return F.conv2d(padded, disk.float()[None, None])[:, 0] > 0


def edge_map(labels: Tensor, radius: int = 2) -> Tensor:
    """Labels ``b h w`` (>= 0 classes, < 0 ignore) -> bool edges ``b h w`` (SAZS's radius 2 rule)."""
    disk = _disk(radius, labels.device)
    edges = torch.zeros_like(labels, dtype=torch.bool)
    for value in labels[labels >= 0].unique().tolist():
        inside = labels == value
        # inside: a non-class pixel (or the border) within the radius; outside: a class pixel.
        edges |= inside & _dilate(~inside, disk, outside=True)
        edges |= ~inside & _dilate(inside, disk, outside=False)
    return edges


def balanced_edge_bce(edge_logits: Tensor, edges: Tensor, valid: Tensor | None = None) -> Tensor:
    """SAZS's ``bce2d``: BCE with logits, edge pixels weighted by the non-edge share and non-edge
    pixels by the edge share (over the whole batch), ``valid`` False weighted 0; mean over all."""
    target = edges.float()
    valid = torch.ones_like(edges) if valid is None else valid
    pos, neg = (edges & valid).sum().float(), (~edges & valid).sum().float()
    total = (pos + neg).clamp(min=1)
    weight = torch.where(edges, neg / total, pos / total) * valid.float()
    return F.binary_cross_entropy_with_logits(edge_logits.float(), target, weight)


def edge_attention_loss(
    scores: Tensor, target: Tensor, edge_logits: Tensor, threshold: float = 0.8
) -> Tensor:
    """SAZS's edge attention: scores ``b c h w`` (unnormalised), target ``b h w`` (class or < 0 to
    ignore), edge logits ``b h w``. Cross-entropy on the pixels whose edge logit exceeds
    ``threshold``, class weights ``1 + (1 - share)`` for the classes present in the batch's kept
    target (1 for the others), the weighted mean per image, summed over images."""
    kept = torch.where(edge_logits > threshold, target, torch.full_like(target, -1))
    classes = scores.shape[1]
    bins = torch.bincount(kept[kept >= 0].view(-1), minlength=classes)[:classes].float()
    share = bins / bins.sum().clamp(min=1)
    weight = (bins > 0).float() * (1 - share) + 1
    loss = scores.new_zeros((), dtype=torch.float32)
    for i in range(len(scores)):
        if (kept[i] >= 0).any():
            loss = loss + F.cross_entropy(scores[i : i + 1].float(), kept[i : i + 1], weight, ignore_index=-1)
    return loss


class EdgeHead(nn.Module):
    """The head's dense features ``(b q) d h w`` or ``b d h w`` -> edge logits ``b h w``.

    Per-name features (the Fusioner head decodes each name apart) give one edge logit per name; the
    image's is their maximum, an edge of any name's mask being an edge of the image.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, 1, 1)

    def forward(self, features: Tensor, batch: int) -> Tensor:
        logits = self.proj(features.float())[:, 0]  # (b q) h w
        return reduce(logits, "(b q) h w -> b h w", "max", b=batch)


def inverseform_input(edge_logits: Tensor) -> Tensor:
    """Edge logits ``b h w`` -> the prediction map InverseTransform2D reads, ``b 1 h w``: the
    official ``F.log_softmax`` over the (single) channel axis, 0 everywhere."""
    return F.log_softmax(edge_logits.float()[:, None], dim=1)


def sazs_edge_loss(
    edge_head: EdgeHead,
    features: Tensor,
    named: Tensor,
    target: Tensor,
    class_idx: Tensor,
    inverse_net: InverseNet | None = None,
) -> Tensor:
    """SAZS's edge terms for a batch: dense features ``(b q) d h w``, name logits ``b k h w``,
    labels ``b h w`` at full size, class_idx ``b k``; with ``inverse_net`` (InverseForm's frozen
    regressor, moved to the batch's device here) the third, InverseForm term. Edges are found at
    full size and sampled (nearest) to the edge branch's size, as SAZS does; the segmentation
    classes of the attention term are background (score 0, the sigmoid's threshold) and the ``k``
    names."""
    b = named.shape[0]
    if features.ndim != 4:
        raise FusionerError(
            "config key 'sazs_edge_weight': the edge branch needs a head with per-pixel dense "
            f"features ('(b q) d h w'); this head's are {tuple(features.shape)}"
        )
    edge_logits = edge_head(features, b)
    edges = resize_labels(edge_map(target).long(), edge_logits.shape[-2:]).bool()
    small = resize_labels(target, edge_logits.shape[-2:])
    loss = EDGE_WEIGHT * balanced_edge_bce(edge_logits, edges)
    if inverse_net is not None:
        predicted, truth = inverseform_input(edge_logits), edges.float()[:, None]
        loss = loss + INVERSE_WEIGHT * inverseform_distance(
            inverse_net.to(edge_logits.device), predicted, truth
        )
    slot = (small[:, None] == class_idx[:, :, None, None] + 1).float()
    target = torch.where(slot.any(1), slot.argmax(1) + 1, torch.where(small == 0, 0, -1))
    scores = F.interpolate(named.float(), size=edge_logits.shape[-2:], mode="bilinear", align_corners=False)
    scores = torch.cat([scores.new_zeros(b, 1, *scores.shape[-2:]), scores], dim=1)
    return loss + ATTENTION_WEIGHT * edge_attention_loss(scores, target, edge_logits)


__all__ = [
    "EdgeHead",
    "balanced_edge_bce",
    "edge_attention_loss",
    "edge_map",
    "inverseform_input",
    "sazs_edge_loss",
]
