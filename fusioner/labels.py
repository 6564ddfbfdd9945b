"""Full-size labels over K names from logits held at the decoder's resolution.

Evaluation needs, per image, the best name of every pixel at the image's own size (GZSS, n-way)
and the full-size logits of the few names present in it (1-way). Resizing all K logit maps to full
size and taking the argmax there costs more than the head itself (issue 24: with 1,175 names,
0.2 s to resize and 0.28 s for the argmax per 224 px image, against 0.16 s for the head). Here the
resize is :func:`upsample`, bilinear (``align_corners=False``) written with elementwise operations
only, so a name's full-size logits are the same bits whichever other names are resized with it
(``F.interpolate`` on CPU is not: its result for one channel changes with the channel count).
That makes :func:`best_name` exact: it resizes, pixel by pixel, only the names that can win there
and returns exactly ``upsample(logits).max(0)``, ties included.

Why few names can win: a resized logit is a convex combination of the 2 x 2 decoder cells around
the pixel, so it lies between their min and max (up to rounding, which ``TOLERANCE`` covers). In
each 2 x 2 block, a name whose max is below some name's min (that of the best name at one of the
block's four cells) loses at every pixel the block serves.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rounding slack of the bounds, relative to the largest |logit| + |bias|: a float32 bilinear blend
# is off its exact value by a few units in the last place (6e-8 each); 1e-5 is far above that.
TOLERANCE = 1e-5
# Candidate names resized per step: bounds memory when a flat image leaves many names in a block.
SLOTS_PER_STEP = 16


def _weights(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The source rows (``i0``, ``i1``) and weights (``w0``, ``w1``) of ``n_out`` output rows,
    ``align_corners=False`` (half-pixel centres, clamped at the border), float32 as PyTorch's."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    src = (scale * (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=n_in - 1)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, 1 - w1, w1


def _blend(c00: Tensor, c01: Tensor, c10: Tensor, c11: Tensor, wx: tuple[Tensor, Tensor], wy: tuple[Tensor, Tensor]) -> Tensor:
    # The one formula both :func:`upsample` and :func:`best_name` evaluate: same operations in the
    # same order, hence the same bits.
    return (c00 * wx[0] + c01 * wx[1]) * wy[0] + (c10 * wx[0] + c11 * wx[1]) * wy[1]


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``k h w`` -> ``k H W``, bilinear, ``align_corners=False``; each name resized on its own."""
    k, h, w = logits.shape
    if (h, w) == tuple(size):
        return logits
    y0, y1, wy0, wy1 = _weights(h, size[0], logits.device)
    x0, x1, wx0, wx1 = _weights(w, size[1], logits.device)
    top, bottom = logits[:, y0], logits[:, y1]  # k H w
    return _blend(top[:, :, x0], top[:, :, x1], bottom[:, :, x0], bottom[:, :, x1], (wx0, wx1), (wy0[:, None], wy1[:, None]))


def _candidates(logits: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``k h w`` -> (``m h w`` candidate names per 2 x 2 block, ``m h w`` bool: slot in use).

    Block ``(i, j)`` holds cells ``i, i + 1`` x ``j, j + 1`` (the last row / column repeated at the
    border). A name is a candidate when its largest logit in the block reaches the lower bound: the
    smallest logit, in the block, of the best name at one of its cells.
    """
    k, h, w = logits.shape
    shifted = logits - bias[:, None, None]
    pad = torch.cat([shifted, shifted[:, -1:]], dim=1)
    pad = torch.cat([pad, pad[:, :, -1:]], dim=2)  # k (h+1) (w+1)
    corners = [pad[:, :h, :w], pad[:, 1:, :w], pad[:, :h, 1:], pad[:, 1:, 1:]]
    winners = shifted.argmax(0)  # h w: the best name at each cell
    padw = torch.cat([winners, winners[-1:]], dim=0)
    padw = torch.cat([padw, padw[:, -1:]], dim=1)
    lower = torch.full((h, w), -torch.inf, device=logits.device)
    for name in (padw[:h, :w], padw[1:, :w], padw[:h, 1:], padw[1:, 1:]):
        low = torch.stack([c.gather(0, name[None])[0] for c in corners]).amin(0)
        lower = torch.maximum(lower, low)
    scale = float(logits.abs().amax()) + float(bias.abs().amax()) if logits.numel() else 0.0
    floor = lower - TOLERANCE * scale
    keep = corners[0] >= floor
    for corner in corners[1:]:
        keep |= corner >= floor
    count = keep.sum(0)  # h w, >= 1: the winners themselves
    m = int(count.max())
    name, cell = keep.flatten(1).nonzero(as_tuple=True)  # ordered by name, then cell
    order = torch.sort(cell, stable=True).indices  # by cell, names ascending within a cell
    name, cell = name[order], cell[order]
    first = torch.cumsum(count.flatten(), 0) - count.flatten()
    slot = torch.arange(len(cell), device=logits.device) - first[cell]
    table = torch.zeros(m, h * w, dtype=torch.long, device=logits.device)
    used = torch.zeros(m, h * w, dtype=torch.bool, device=logits.device)
    table[slot, cell] = name
    used[slot, cell] = True
    return table.view(m, h, w), used.view(m, h, w)


def best_name(logits: Tensor, size: tuple[int, int], bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``k h w`` logits -> (value, index), each ``H W``: exactly ``(upsample(logits, size) - bias).max(0)``.

    ``bias`` (``k``, default 0) is subtracted from each name's resized logits (calibrated stacking);
    ties go to the lowest index, as ``max`` does. Memory: ``16 x H x W``, not ``k x H x W``.
    """
    k, h, w = logits.shape
    bias = torch.zeros(k, device=logits.device, dtype=logits.dtype) if bias is None else bias.to(logits)
    if (h, w) == tuple(size):  # already full size (sliding windows, a head that resizes features)
        return (logits - bias[:, None, None]).max(0)
    if not bool(torch.isfinite(logits).all()):  # the bounds assume finite logits
        return (upsample(logits, size) - bias[:, None, None]).max(0)
    table, used = _candidates(logits, bias)
    y0, y1, wy0, wy1 = _weights(h, size[0], logits.device)
    x0, x1, wx0, wx1 = _weights(w, size[1], logits.device)
    flat = logits.flatten()
    best = torch.full(tuple(size), -torch.inf, device=logits.device, dtype=logits.dtype)
    index = torch.full(tuple(size), k, dtype=torch.long, device=logits.device)
    for start in range(0, table.shape[0], SLOTS_PER_STEP):
        names = table[start : start + SLOTS_PER_STEP][:, y0][:, :, x0]  # s H W: each pixel's block
        active = used[start : start + SLOTS_PER_STEP][:, y0][:, :, x0]
        base = names * (h * w)
        rows0, rows1 = (y0 * w)[:, None], (y1 * w)[:, None]
        value = _blend(
            flat[base + rows0 + x0], flat[base + rows0 + x1], flat[base + rows1 + x0], flat[base + rows1 + x1],
            (wx0, wx1), (wy0[:, None], wy1[:, None]),
        ) - bias[names]
        value = torch.where(active, value, -torch.inf)
        top = value.amax(0)
        # The lowest name index among the slots that reach the top: argmax's tie rule.
        name = torch.where(active & (value == top), names, k).amin(0)
        better = (top > best) | ((top == best) & (name < index))
        best, index = torch.where(better, top, best), torch.where(better, name, index)
    return best, index
