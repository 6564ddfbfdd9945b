"""Per-class mask losses over non-ignored pixels: what every head design trains with (the training
loop, fusioner/engine/train.py, and the methods' objectives, fusioner/methods/objective.py)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``b h w`` integer labels -> ``b *size`` by nearest sampling of pixel centres."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(labels.dtype)


def mask_loss(logits: Tensor, targets: Tensor, valid: Tensor, dice_weight: float = 1.0) -> Tensor:
    """BCE with logits (+ ``dice_weight`` x soft dice), one binary mask per class token.

    logits, targets: ``b k h w``; valid: ``b h w`` (False at ignore pixels). The dice term is
    class-balanced: with many names per image, plain BCE is dominated by the background of each
    mask and collapses to "nothing anywhere". Dice is averaged over the masks that are present
    only: on an absent name's empty mask it would be ~1 for the faintest false positive, which
    again makes "nothing anywhere" the easiest answer; BCE already covers absent names.
    """
    logits = logits.float()
    weight = valid[:, None].float()  # b 1 h w: broadcast over classes, never materialised per class
    targets = targets.float() * weight
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = (bce * weight).sum() / (weight.sum() * logits.shape[1]).clamp(min=1)
    if not dice_weight:
        return bce
    probs = torch.sigmoid(logits) * weight
    area = targets.sum((-2, -1))  # b k
    inter = (probs * targets).sum((-2, -1))
    dice = 1 - (2 * inter + 1) / (probs.sum((-2, -1)) + area + 1)  # b k
    present = (area > 0).float()
    return bce + dice_weight * (dice * present).sum() / present.sum().clamp(min=1)


def rank_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Per-pixel softmax cross-entropy over ``[background ; the k queried names]``.

    logits: ``b k h w``; targets: ``b k h w`` binary (at most one name per pixel); valid: ``b h w``.
    The per-name BCE / dice above train each mask on its own: a head trained only on them learns
    "where is this name" but never which of two names fits a pixel better, and ranking is what
    every multi-name query (GZSS, n-way, ``predict`` with a list) needs. Background is a constant
    logit 0, the decision boundary of ``labels_from_logits`` at threshold 0.5, so the training
    rule and the inference rule agree. ``valid`` must also be False on pixels of a class that was
    not queried: they have no right answer among the candidates.
    """
    logits = logits.float()
    b, _, h, w = logits.shape
    full = torch.cat([logits.new_zeros(b, 1, h, w), logits], dim=1)  # b (1+k) h w
    hit = targets.bool()
    index = torch.where(hit.any(1), hit.float().argmax(1) + 1, 0)  # b h w
    return F.cross_entropy(full, torch.where(valid, index, -100), ignore_index=-100)
