"""Per-class mask losses over non-ignored pixels."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def mask_loss(logits: Tensor, targets: Tensor, valid: Tensor, dice_weight: float = 1.0) -> Tensor:
    """BCE with logits (+ ``dice_weight`` x soft dice), one binary mask per class token.

    logits, targets: ``b k h w``; valid: ``b h w`` (False at ignore pixels). The dice term is
    class-balanced: with many names per image, plain BCE is dominated by the background of each
    mask and collapses to "nothing anywhere".
    """
    logits = logits.float()
    weight = valid.unsqueeze(1).expand_as(logits).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp(min=1)
    if not dice_weight:
        return bce
    probs = logits.sigmoid() * weight
    inter = (probs * targets).flatten(2).sum(-1)
    total = probs.flatten(2).sum(-1) + (targets * weight).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (total + 1)  # b k
    return bce + dice_weight * dice.mean()
