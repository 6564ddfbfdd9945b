"""The one path from images + names to logits and labels.

``FusionerModel.logits / predict``, ``fusioner predict``, evaluation and the quickstart all call
:func:`image_logits`; nothing else resizes or tiles. Two modes (config key ``eval_mode``):

- ``fixed``: the image is resized to ``size x size`` (the training size), the logits are resized
  back to the image's own size. Reads cached tokens when the caller has them.
- ``sliding``: overlapping ``size x size`` windows (stride 2/3 of a window) over the image at its
  own resolution, logits averaged where windows overlap; images smaller than a window are padded.

Names are scored in chunks of ``NAMES_PER_PASS`` so memory stays flat with hundreds of names. Both
fusion rules score every name independently of the others asked with it, so chunking changes no
number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

NAMES_PER_PASS = 64


def labels_from_logits(
    logits: Tensor, threshold: float, *, seen_bias: float = 0.0, seen: Tensor | None = None
) -> Tensor:
    """``b k h w`` logits -> ``b h w`` labels: 0 where every class is below threshold, else argmax + 1.

    ``seen_bias`` is subtracted from the logits of the names flagged in ``seen`` (bool ``k``) before
    both decisions: calibrated stacking (ZS3Net, ZegFormer), which offsets a head's preference for
    the names it was trained on. ``seen_bias=0`` is the plain rule.
    """
    if seen_bias:
        if seen is None:
            raise ValueError("seen_bias needs the seen flags of the k names")
        logits = logits - seen_bias * seen.to(logits.device, logits.dtype)[:, None, None]
    # sigmoid is monotonic: take the max on logits and apply it to one value per pixel, not k.
    best, index = logits.max(dim=1)
    return torch.where(best.float().sigmoid() >= threshold, index + 1, torch.zeros_like(index))


def _head_logits(model, tokens: Tensor, grid: tuple[int, int], text: Tensor) -> Tensor:
    """tokens ``1 n c``, text ``k ct`` -> logits ``1 k h w`` at the decoder's resolution, in chunks."""
    tokens = tokens.to(text.device, torch.float32)
    chunks = [model.head(tokens, grid, part[None]) for part in text.split(NAMES_PER_PASS)]
    return torch.cat(chunks, dim=1)


def _square(image: Tensor, size: int) -> Tensor:
    """``3 H W`` -> ``1 3 size size``, antialiased as the training resize."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _encode(model, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
    out = model.vision(image)
    return out.tokens, out.grid


def fixed_logits(model, image: Tensor, text: Tensor, size: int, tokens: Tensor | None = None) -> Tensor:
    """image ``3 H W``, text ``k ct`` -> logits ``k H W``; ``tokens`` ``gh gw c``: cached features."""
    h, w = image.shape[-2:]
    if tokens is not None:
        flat, grid = tokens.flatten(0, 1)[None], (tokens.shape[0], tokens.shape[1])
    else:
        flat, grid = _encode(model, _square(image, size))
    logits = _head_logits(model, flat, grid, text)  # at the decoder's resolution: resized once, here
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]


def sliding_logits(model, image: Tensor, text: Tensor, size: int, tokens: Tensor | None = None) -> Tensor:
    """Average the logits of ``size x size`` windows (stride 2/3 size) over the original image."""
    h, w = image.shape[-2:]
    ph, pw = max(h, size), max(w, size)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    stride = max(1, size * 2 // 3)
    ys = sorted({min(y, ph - size) for y in range(0, ph - size + stride, stride)})
    xs = sorted({min(x, pw - size) for x in range(0, pw - size + stride, stride)})
    total = torch.zeros(text.shape[0], ph, pw, device=text.device)
    count = torch.zeros(1, ph, pw, device=text.device)
    for y in ys:
        for x in xs:
            flat, grid = _encode(model, padded[None, :, y : y + size, x : x + size])
            logits = _head_logits(model, flat, grid, text)
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            total[:, y : y + size, x : x + size] += logits[0].float()
            count[:, y : y + size, x : x + size] += 1
    return (total / count)[:, :h, :w]


MODES: dict[str, Callable[..., Tensor]] = {"fixed": fixed_logits, "sliding": sliding_logits}


def image_logits(
    model, image: Tensor, text: Tensor, *, size: int, mode: str = "fixed", tokens: Tensor | None = None
) -> Tensor:
    """One image ``3 H W`` of any size, text embeddings ``k ct`` -> logits ``k H W``."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image '3 h w', got shape {tuple(image.shape)}")
    if tokens is not None and mode != "fixed":
        raise ValueError("cached tokens are features of the fixed-size image; sliding mode cannot use them")
    return MODES[mode](model, image, text, size, tokens)


def batch_logits(
    model, images: Tensor | Sequence[Tensor], text: Tensor, *, size: int, mode: str = "fixed"
) -> list[Tensor]:
    """Images ``b 3 h w`` (or a list of ``3 h w`` of any sizes) -> one ``k h w`` logits per image.

    In fixed mode the backbone runs once over the whole batch (every image resized to ``size``).
    """
    images = list(images)
    if mode != "fixed" or len(images) < 2:
        return [image_logits(model, im, text, size=size, mode=mode) for im in images]
    out = model.vision(torch.cat([_square(im, size) for im in images]))
    gh, gw = out.grid
    grids = out.tokens.unflatten(1, (gh, gw))  # b gh gw c
    return [
        image_logits(model, im, text, size=size, mode="fixed", tokens=g)
        for im, g in zip(images, grids, strict=True)
    ]
