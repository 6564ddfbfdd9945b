"""The one path from images + names to logits and labels.

``FusionerModel.logits / predict``, ``fusioner predict``, evaluation and the quickstart all call
:func:`image_logits`; nothing else resizes or tiles. Two modes (config key ``eval_mode``):

- ``fixed``: the image is resized to ``size x size`` (the training size), the logits are resized
  back to the image's own size. Reads cached tokens when the caller has them.
- ``sliding``: overlapping ``size x size`` windows (stride 2/3 of a window) over the image at its
  own resolution, logits averaged where windows overlap; images smaller than a window are padded.

Names are scored in chunks of ``NAMES_PER_PASS`` so memory stays flat with hundreds of names. Both
fusion rules score every name independently of the others asked with it, so chunking changes no
number beyond float rounding. A decoupled head takes every name that fits ``DECOUPLED_PASS_BYTES``
in one pass: its patch path does not read the names, and running it once per chunk cost more than
the rest of the head (issue 24).

Evaluation reads the logits at the head's own resolution (:func:`decoder_logits`) and resizes only
what it scores (fusioner/labels.py): the best name per pixel without ``k`` full-size maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from fusioner.config import register_choices
from fusioner.labels import best_name, decide
from fusioner.methods.registry import call_head

NAMES_PER_PASS = 64
# A decoupled head's names-per-pass cap, in bytes of what grows with the names: per name, its
# heads x (n + 1) float32 attention scores and its logits at the decoder's 8x grid (64 n).
DECOUPLED_PASS_BYTES = 256 << 20


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
    return decide(best, index, threshold)


def labels_of(logits: Tensor | list[Tensor], threshold: float) -> Tensor | list[Tensor]:
    """What ``predict`` returns for what ``logits`` returned: ``k h w`` -> ``h w``, ``b k h w`` ->
    ``b h w``, a list of ``k h w`` -> a list of ``h w`` (0 = background, i = names[i - 1])."""
    if isinstance(logits, Tensor) and logits.ndim == 3:
        return labels_from_logits(logits[None], threshold)[0]
    labels = [labels_from_logits(one[None], threshold)[0] for one in logits]
    return torch.stack(labels) if isinstance(logits, Tensor) else labels


def _head_logits(
    model,
    tokens: Tensor,
    grid: tuple[int, int],
    text: Tensor,
    image: Tensor | None = None,
    cls: Tensor | None = None,
    view: int | None = None,
) -> Tensor:
    """tokens ``1 n c``, text ``k ct`` -> logits ``1 k h w`` at the decoder's resolution, in chunks.

    A head whose decoder resizes its features (``decoder: released``) scores at ``view x view``
    instead, the size of the view the tokens came from: the released code resizes the features, not
    the logits, and the two orders differ (issue 20). Callers resize either result the same way.

    The model's refiner (config key ``refine``, fusioner/methods) runs here, on the logits of every
    name at once, so evaluation, ``predict`` and ``FusionerModel.logits`` all see it; ``image``
    (``1 3 s s``, the view the tokens came from) serves a refiner with a backbone of its own; ``cls``
    (``1 c``, the view's CLS token) reaches the heads that read it (ZegCLIP).
    """
    tokens = tokens.to(text.device, torch.float32)
    cls = cls.to(text.device, torch.float32) if cls is not None else None
    at = {"size": (view, view)} if view and getattr(model.head, "resizes_features", False) else {}
    parts = text.split(names_per_pass(model, tokens.shape[1]))
    chunks = [call_head(model.head, tokens, grid, part[None], cls, **at) for part in parts]
    logits = torch.cat(chunks, dim=1)
    refiner = getattr(model, "refiner", None)
    return logits if refiner is None else refiner(logits, tokens, grid, image)


def names_per_pass(model, tokens: int) -> int:
    """Names per head pass with ``tokens`` patch tokens: all that fit ``DECOUPLED_PASS_BYTES``
    for a decoupled head (patches never read names, so one pass runs the patch path and the decoder
    once for every name), else :data:`NAMES_PER_PASS` (a joint head runs one sequence per name)."""
    config = getattr(getattr(model.head, "_orig_mod", model.head), "config", None)
    if getattr(config, "fusion_attention", None) != "decoupled":
        return NAMES_PER_PASS
    heads = max(1, int(getattr(config, "heads", 1)))
    return max(NAMES_PER_PASS, DECOUPLED_PASS_BYTES // (4 * (heads * (tokens + 1) + 64 * tokens)))


def square_view(image: Tensor, size: int) -> Tensor:
    """``3 H W`` -> ``1 3 size size``, antialiased as the training resize."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _encode(model, image: Tensor) -> tuple[Tensor, tuple[int, int], Tensor | None]:
    out = model.vision(image)
    return out.tokens, out.grid, out.cls


def decoder_logits(
    model, image: Tensor, text: Tensor, size: int, tokens: Tensor | None = None, cls: Tensor | None = None
) -> Tensor:
    """Fixed mode before the last resize: image ``3 H W``, text ``k ct`` -> logits ``k h' w'`` at
    the head's resolution (the decoder's, or ``size x size`` for a head that resizes features);
    :func:`fixed_logits` resizes them to ``H W``. ``tokens`` ``gh gw c`` and ``cls`` ``c``: cached
    features."""
    # Cached tokens need no resized image, unless the refiner runs a backbone of its own on it.
    wants_view = tokens is None or getattr(getattr(model, "refiner", None), "vision", None) is not None
    square = square_view(image, size) if wants_view else None
    if tokens is not None:
        flat, grid = tokens.flatten(0, 1)[None], (tokens.shape[0], tokens.shape[1])
        cls = cls[None] if cls is not None else None
    else:
        flat, grid, cls = _encode(model, square)
    # At the decoder's resolution (or the view's, see _head_logits): resized once, by the caller.
    return _head_logits(model, flat, grid, text, square, cls, size)[0]


def fixed_logits(
    model, image: Tensor, text: Tensor, size: int, tokens: Tensor | None = None, cls: Tensor | None = None
) -> Tensor:
    """image ``3 H W``, text ``k ct`` -> logits ``k H W``; ``tokens`` ``gh gw c`` and ``cls`` ``c``:
    cached features."""
    logits = decoder_logits(model, image, text, size, tokens, cls)
    return F.interpolate(logits[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]


def _windows(image: Tensor, size: int) -> tuple[Tensor, list[int], list[int]]:
    """``3 H W`` -> the image padded to at least ``size`` each way, the window rows and columns
    (stride 2/3 of a window; the last window ends at the border)."""
    h, w = image.shape[-2:]
    ph, pw = max(h, size), max(w, size)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    stride = max(1, size * 2 // 3)
    ys = sorted({min(y, ph - size) for y in range(0, ph - size + stride, stride)})
    xs = sorted({min(x, pw - size) for x in range(0, pw - size + stride, stride)})
    return padded, ys, xs


def sliding_logits(
    model, image: Tensor, text: Tensor, size: int, tokens: Tensor | None = None, cls: Tensor | None = None
) -> Tensor:
    """Average the logits of ``size x size`` windows (stride 2/3 size) over the original image."""
    h, w = image.shape[-2:]
    padded, ys, xs = _windows(image, size)
    ph, pw = padded.shape[-2:]
    total = torch.zeros(text.shape[0], ph, pw, device=text.device)
    count = torch.zeros(1, ph, pw, device=text.device)
    for y in ys:
        for x in xs:
            window = padded[None, :, y : y + size, x : x + size]
            flat, grid, window_cls = _encode(model, window)
            logits = _head_logits(model, flat, grid, text, window, window_cls, size)
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
            total[:, y : y + size, x : x + size] += logits[0].float()
            count[:, y : y + size, x : x + size] += 1
    return (total / count)[:, :h, :w]


MODES: dict[str, Callable[..., Tensor]] = {"fixed": fixed_logits, "sliding": sliding_logits}
register_choices("eval_mode", MODES)


def image_logits(
    model,
    image: Tensor,
    text: Tensor,
    *,
    size: int,
    mode: str = "fixed",
    tokens: Tensor | None = None,
    cls: Tensor | None = None,
) -> Tensor:
    """One image ``3 H W`` of any size, text embeddings ``k ct`` -> logits ``k H W``; ``tokens``
    (``gh gw c``) and ``cls`` (``c``): the fixed-size image's cached features."""
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image '3 h w', got shape {tuple(image.shape)}")
    if tokens is not None and mode != "fixed":
        raise ValueError("cached tokens are features of the fixed-size image; sliding mode cannot use them")
    return MODES[mode](model, image, text, size, tokens, cls)


def batch_logits(
    model, images: Tensor | Sequence[Tensor], text: Tensor, *, size: int, mode: str = "fixed"
) -> list[Tensor]:
    """Images ``b 3 h w`` (or a list of ``3 h w`` of any sizes) -> one ``k h w`` logits per image.

    In fixed mode the backbone runs once over the whole batch (every image resized to ``size``).
    """
    images = list(images)
    if mode != "fixed" or len(images) < 2:
        return [image_logits(model, im, text, size=size, mode=mode) for im in images]
    out = model.vision(torch.cat([square_view(im, size) for im in images]))
    gh, gw = out.grid
    grids = out.tokens.unflatten(1, (gh, gw))  # b gh gw c
    cls = out.cls if out.cls is not None else [None] * len(images)
    return [
        image_logits(model, im, text, size=size, mode="fixed", tokens=g, cls=c)
        for im, g, c in zip(images, grids, cls, strict=True)
    ]


@torch.no_grad()
def argmax_labels(
    model,
    image: Tensor,
    text: Tensor,
    *,
    size: int,
    mode: str = "fixed",
    out_size: tuple[int, int] | None = None,
) -> Tensor:
    """image ``3 H W``, text ``k ct`` -> ``h w`` int64: the index of the best-scoring name per pixel.

    The n-way rule of the open-vocabulary benchmarks (every pixel gets a name; no threshold, no
    background). ``out_size`` (default ``H W``): the resolution the labels are wanted at, e.g. the
    ground truth's when ``image`` was resized. The backbone runs once (once per window). Fixed mode
    keeps the ``k`` logit maps at the head's resolution and resizes, pixel by pixel, only the names
    that can win there (:func:`fusioner.labels.best_name`: exact, 5x faster than resizing all);
    sliding mode sends names through the head :data:`NAMES_PER_PASS` at a time and keeps a running
    max and argmax. Either way no ``k x h x w`` full-size logits (847 names at 512 x 683 would be
    1.2 GB of float32). Equal to ``image_logits(...).argmax(0)`` resized, up to float ties.
    """
    if mode not in MODES:
        raise ValueError(f"inference mode must be one of {', '.join(MODES)}, got {mode!r}")
    h, w = image.shape[-2:]
    out_h, out_w = out_size or (h, w)
    if mode == "fixed":  # every name at the head's resolution; only candidates resized (labels.py)
        return best_name(decoder_logits(model, image, text, size).float(), (out_h, out_w))[1]
    # (view, its tokens and grid, its origin): the backbone runs once per view, whatever k is.
    if mode == "fixed":
        square = square_view(image, size)
        views = [(square, _encode(model, square), None)]
        padded_size = (h, w)
    else:
        padded, ys, xs = _windows(image, size)
        padded_size = tuple(padded.shape[-2:])
        windows = [((y, x), padded[None, :, y : y + size, x : x + size]) for y in ys for x in xs]
        views = [(window, _encode(model, window), origin) for origin, window in windows]
    best = torch.full((out_h, out_w), -torch.inf, device=text.device)
    index = torch.zeros((out_h, out_w), dtype=torch.long, device=text.device)
    for start in range(0, text.shape[0], NAMES_PER_PASS):
        part = text[start : start + NAMES_PER_PASS]
        # A refiner sees the names chunk by chunk; spectral (fusioner/methods) refines each name
        # apart, so the chunks change no number.
        if mode == "fixed":
            square, (flat, grid, cls), _ = views[0]
            # c gh' gw', the decoder's resolution (or the view's, see _head_logits)
            logits = _head_logits(model, flat, grid, part, square, cls, size)[0]
        else:
            logits = torch.zeros(part.shape[0], *padded_size, device=text.device)
            count = torch.zeros(1, *padded_size, device=text.device)
            for view, (flat, grid, cls), (y, x) in views:
                window = _head_logits(model, flat, grid, part, view, cls, size)
                window = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False)
                logits[:, y : y + size, x : x + size] += window[0].float()
                count[:, y : y + size, x : x + size] += 1
            logits = (logits / count)[:, :h, :w]
        logits = F.interpolate(
            logits[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False
        )
        value, arg = logits[0].max(0)
        better = value > best  # strict: a tie keeps the earlier name, as argmax over all k does
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    return index
