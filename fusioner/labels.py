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
each 2 x 2 block, a name whose max is below another name's min loses at every pixel the block
serves. On a trained head about ten of 1,175 names per block survive (benchmarks/RESULTS.md).
:func:`upsample` differs from ``F.interpolate`` by float rounding only (tests/test_labels.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Rounding slack of the bounds, relative to the largest |logit| + |bias|: a float32 bilinear blend
# is off its exact value by a few units in the last place (6e-8 each); 1e-5 is far above that.
TOLERANCE = 1e-5
# (pixel, candidate name) pairs resized per step: bounds memory when flat logits leave many names
# in a block (all k tie on a constant map).
PAIRS_PER_STEP = 1 << 21
# Names per pass when bounding them: buffers small enough to stay in cache and be reused.
NAMES_PER_STEP = 64


def _weights(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The source rows (``i0``, ``i1``) and weights (``w0``, ``w1``) of ``n_out`` output rows,
    ``align_corners=False`` (half-pixel centres, clamped at the border), float32 as PyTorch's."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    src = (scale * (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) - 0.5).clamp(min=0)
    i0 = src.long().clamp(max=n_in - 1)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, 1 - w1, w1


def _blend(
    c00: Tensor, c01: Tensor, c10: Tensor, c11: Tensor, wx: tuple[Tensor, Tensor], wy: tuple[Tensor, Tensor]
) -> Tensor:
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
    return _blend(
        top[:, :, x0],
        top[:, :, x1],
        bottom[:, :, x0],
        bottom[:, :, x1],
        (wx0, wx1),
        (wy0[:, None], wy1[:, None]),
    )


def _block_extreme(logits: Tensor, rows: Tensor, out: Tensor, fn) -> Tensor:
    """``k h w`` -> the max (``fn=torch.maximum``) or min of each 2 x 2 block, in ``out``.

    Block ``(i, j)`` holds cells ``i, i + 1`` x ``j, j + 1``, the last row / column repeated at the
    border: the cells that a pixel mapped to cell ``(i, j)`` blends. ``rows`` is a scratch buffer
    of ``out``'s shape.
    """
    fn(logits[:, :-1], logits[:, 1:], out=rows[:, :-1])
    rows[:, -1] = logits[:, -1]
    fn(rows[:, :, :-1], rows[:, :, 1:], out=out[:, :, :-1])
    out[:, :, -1] = rows[:, :, -1]
    return out


def _candidates(logits: Tensor, slack: float) -> tuple[Tensor, Tensor]:
    """``k h w`` (bias already subtracted) -> the names that can win in each 2 x 2 block, as
    (names, ordered by block then name; ``h w`` count per block).

    A name is a candidate when its largest logit in the block reaches the largest, over names, of
    the smallest logit in the block (less ``slack``): below it, the name loses at every pixel the
    block serves. Names go ``NAMES_PER_STEP`` at a time through small reused buffers: a pass over
    ``k x h x w`` fresh memory costs more in page faults than in arithmetic.
    """
    k, h, w = logits.shape
    step = min(k, NAMES_PER_STEP)
    rows, block = torch.empty(step, h, w, device=logits.device), torch.empty(step, h, w, device=logits.device)
    keep = torch.empty(step, h, w, dtype=torch.bool, device=logits.device)
    floor = torch.full((h, w), -torch.inf, device=logits.device)
    for start in range(0, k, step):
        part = logits[start : start + step]
        n = part.shape[0]
        floor = torch.maximum(floor, _block_extreme(part, rows[:n], block[:n], torch.minimum).amax(0))
    floor -= slack
    found = []
    for start in range(0, k, step):
        part = logits[start : start + step]
        n = part.shape[0]
        high = _block_extreme(part, rows[:n], block[:n], torch.maximum)
        found.append(torch.ge(high, floor, out=keep[:n]).view(-1).nonzero()[:, 0] + start * h * w)
    flat = torch.cat(found)  # name * h * w + block, by name then block
    name, cell = flat // (h * w), flat % (h * w)
    order = torch.sort(cell, stable=True).indices
    return name[order], torch.bincount(cell, minlength=h * w).view(h, w)


def best_name(logits: Tensor, size: tuple[int, int], bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``k h w`` logits -> (value, index), each ``H W``: exactly ``(upsample(logits, size) - bias).max(0)``.

    ``bias`` (``k``, default 0) is subtracted from each name's resized logits (calibrated stacking);
    ties go to the lowest index, as ``max`` does. Only (pixel, candidate name) pairs are resized,
    about ten per pixel on a trained head (benchmarks/RESULTS.md), at most ``PAIRS_PER_STEP`` at once.
    """
    k, h, w = logits.shape
    size = (int(size[0]), int(size[1]))
    device = logits.device
    bias = torch.zeros(k, device=device, dtype=logits.dtype) if bias is None else bias.to(logits)
    if (h, w) == size:  # already full size (sliding windows, a head that resizes features)
        return (logits - bias[:, None, None]).max(0)
    low, high = torch.aminmax(logits)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):  # the bounds need finite logits
        return (upsample(logits, size) - bias[:, None, None]).max(0)
    slack = TOLERANCE * (max(float(high), -float(low)) + float(bias.abs().max()))
    names, count = _candidates(logits - bias[:, None, None] if bool(bias.any()) else logits, slack)
    y0, y1, wy0, wy1 = _weights(h, size[0], device)
    x0, x1, wx0, wx1 = _weights(w, size[1], device)
    # Per output pixel (flattened): its block's first candidate, its count and its blend.
    starts = (torch.cumsum(count.view(-1), 0) - count.view(-1)).view(h, w)[y0][:, x0].reshape(-1)
    pairs = count[y0][:, x0].reshape(-1)
    corners = [(r[:, None] * w + c).reshape(-1) for r in (y0, y1) for c in (x0, x1)]
    wx = [c.expand(size).reshape(-1) for c in (wx0, wx1)]
    wy = [r[:, None].expand(size).reshape(-1) for r in (wy0, wy1)]
    flat = logits.reshape(-1)
    best = torch.empty(size[0] * size[1], dtype=logits.dtype, device=device)
    index = torch.empty(size[0] * size[1], dtype=torch.long, device=device)
    ends = torch.cumsum(pairs, 0)
    first = 0
    while first < len(pairs):  # pixels in runs of at most PAIRS_PER_STEP pairs (one pixel at least)
        done = int(ends[first - 1]) if first else 0
        last = int(torch.searchsorted(ends, done + PAIRS_PER_STEP, right=True))
        last = min(max(last, first + 1), len(pairs))
        per_pixel = pairs[first:last]
        pixel = torch.repeat_interleave(torch.arange(first, last, device=device), per_pixel)
        offset = torch.arange(len(pixel), device=device) + done - (ends - pairs).index_select(0, pixel)
        name = names.index_select(0, starts.index_select(0, pixel) + offset)
        base = name * (h * w)
        c00, c01, c10, c11 = (flat.index_select(0, base + c.index_select(0, pixel)) for c in corners)
        value = _blend(
            c00, c01, c10, c11, [v.index_select(0, pixel) for v in wx], [v.index_select(0, pixel) for v in wy]
        ) - bias.index_select(0, name)
        local = pixel - first
        run_best = torch.full((last - first,), -torch.inf, dtype=value.dtype, device=device)
        run_best.scatter_reduce_(0, local, value, "amax")
        # The lowest name index among the pairs that reach the best: argmax's tie rule.
        run_index = torch.full((last - first,), k, dtype=torch.long, device=device)
        run_index.scatter_reduce_(
            0, local, torch.where(value == run_best.index_select(0, local), name, k), "amin"
        )
        best[first:last], index[first:last] = run_best, run_index
        first = last
    return best.view(size), index.view(size)


def decide(best: Tensor, index: Tensor, threshold: float) -> Tensor:
    """The best-name rule on (best logit, its index): 0 (background) where the best name's
    probability is below ``threshold``, else index + 1. sigmoid is monotonic: it is applied to one
    value per pixel, not to ``k``."""
    return torch.where(best.float().sigmoid() >= threshold, index + 1, torch.zeros_like(index))


@dataclass(frozen=True)
class ImageScores:
    """One image's logits over ``k`` names, held at the head's resolution and resized on demand.

    What evaluation asks of an image: the full-size logits of the few names scored alone (1-way)
    and the best-name labels over all of them (GZSS, n-way), never ``k`` full-size maps at once.
    """

    logits: Tensor  # k h w, at the head's resolution (or already at ``size``)
    size: tuple[int, int]  # H W, the resolution answers are wanted at

    def of(self, rows: Sequence[int]) -> Tensor:
        """The full-size logits ``len(rows) H W`` of names ``rows``."""
        return upsample(self.logits[list(rows)], self.size)

    def best(self, rows: slice = slice(None), bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(value, index) ``H W`` of the best name among ``rows`` (index relative to ``rows.start``)."""
        return best_name(self.logits[rows], self.size, bias)

    def labels(self, threshold: float, *, seen_bias: float = 0.0, seen: Tensor | None = None) -> Tensor:
        """``H W`` best-name labels, the rule of :func:`fusioner.inference.labels_from_logits` on the
        full-size logits: ``seen_bias`` subtracted from the names flagged in ``seen`` (bool ``k``)."""
        bias = None
        if seen_bias:
            if seen is None:
                raise ValueError("seen_bias needs the seen flags of the k names")
            bias = seen_bias * seen.to(self.logits.device, self.logits.dtype)
        return decide(*self.best(bias=bias), threshold)
