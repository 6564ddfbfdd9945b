"""Per-class mask losses over non-ignored pixels."""

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
