"""Training augmentations, and which of them the frozen-feature cache can follow.

A horizontal flip commutes (approximately) with a convolutional or patch backbone, so it is applied
to cached tokens on their grid and training keeps it at no cost. Random crops and colour jitter
change the pixels the backbone sees: features cached once cannot follow them, so asking for them
together with the cache is an error rather than a silent no-op.

Every random choice comes from the ``rng`` the caller passes (seeded per example), so a resumed
run sees exactly the augmentations an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from fusioner.errors import ConfigError

Apply = Callable[[Tensor, Tensor, np.random.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Augmentation:
    name: str
    apply: Apply  # (image "3 h w", mask "h w", rng) -> both augmented, same size
    on_tokens: bool  # also valid on cached tokens "gh gw c" (only geometric flips are)


def _hflip(x: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    if rng.random() < 0.5:
        return x.flip(-1), mask.flip(-1)
    return x, mask


def _crop(image: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Random crop of 50-100% of each side, resized back to the input size."""
    h, w = mask.shape
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)
    mask = TF.resized_crop(mask[None], top, left, ch, cw, [h, w], interpolation=TF.InterpolationMode.NEAREST)
    return image, mask[0]


def _jitter(image: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Brightness, contrast and saturation each scaled by a factor in [0.7, 1.3]."""
    b, c, s = rng.uniform(0.7, 1.3, size=3)
    image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
    return image.clamp(0, 1), mask


AUGMENTATIONS = {
    a.name: a
    for a in (
        Augmentation("hflip", _hflip, on_tokens=True),
        Augmentation("crop", _crop, on_tokens=False),
        Augmentation("jitter", _jitter, on_tokens=False),
    )
}


def resolve_augmentations(names: Sequence[str], *, cached: bool) -> list[Augmentation]:
    """Look up ``names``; with the feature cache on, refuse the ones that change pixels."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"config key 'augment': unknown {unknown}; known: {', '.join(AUGMENTATIONS)}")
    chosen = [AUGMENTATIONS[n] for n in names]
    pixel_only = [a.name for a in chosen if not a.on_tokens]
    if cached and pixel_only:
        raise ConfigError(
            f"config key 'augment': {pixel_only} change the pixels the frozen backbone sees, which cached "
            "features cannot follow; set use_cache=false (the backbone then runs every step) or drop them"
        )
    return chosen
