"""Colour overlays of label maps with a legend, for `fusioner predict`, the demo and the quickstart report.

Colours come from :func:`palette`: greedy farthest-point picks in CIELAB (the space where distance
follows what eyes see), so the first names get the most distinct colours and 30 names still differ
at a glance; evenly spaced hues at one saturation put dress and purse, coat and skin side by side
from about ten names on. The legend's type scales with the picture, so a 4,000 px photo gets a
legend readable at the size it is viewed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MAX_COLOURS = 255  # background + the 254 names a uint8 label map holds


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``n 3`` sRGB in [0, 255] -> CIELAB (D65)."""
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@lru_cache(maxsize=1)
def _ordered_colours() -> np.ndarray:
    """Black, then MAX_COLOURS - 1 colours, each the farthest (CIELAB) from all picked before it."""
    steps = np.linspace(0, 255, 11)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    # Very dark colours read as the background (black) under a 55% blend: keep L* above 25.
    keep = lab[:, 0] > 25
    grid, lab = grid[keep], lab[keep]
    picked = [np.zeros(3)]
    nearest = np.linalg.norm(lab - _srgb_to_lab(np.zeros((1, 3))), axis=1)
    # Start from a saturated red-orange, not from white (the farthest from black but a poor overlay).
    first = int(np.argmin(np.linalg.norm(grid - np.array([230.0, 25.0, 75.0]), axis=1)))
    for _ in range(MAX_COLOURS - 1):
        i = first if len(picked) == 1 else int(np.argmax(nearest))
        picked.append(grid[i])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[i], axis=1))
    return np.round(np.array(picked)).astype(np.uint8)


def palette(n: int) -> np.ndarray:
    """``n + 1`` RGB colours (uint8 ``n+1 3``): black for background, then perceptually spaced ones.

    Colour i is the same whatever ``n`` is, so a name keeps its colour when names are added after it.
    """
    if n + 1 > MAX_COLOURS:
        raise ValueError(f"palette holds at most {MAX_COLOURS - 1} names, asked for {n}")
    return _ordered_colours()[: n + 1].copy()


def colour_labels(labels: np.ndarray, n: int) -> Image.Image:
    """``h w`` labels (0 = background, i = names[i-1], anything else = white) -> an RGB picture."""
    colours = np.concatenate([palette(n), np.full((256 - n - 1, 3), 255, dtype=np.uint8)])
    return Image.fromarray(colours[np.clip(labels, 0, 255).astype(np.uint8)])


def to_uint8(image: Tensor) -> np.ndarray:
    """``3 h w`` float in [0, 1] -> ``h w 3`` uint8."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_size(width: int, height: int) -> int:
    """Legend / label type in pixels: about 1/45 of the picture's shorter side, 12 px at least."""
    return max(12, round(min(width, height) / 45))


def legend(width: int, names: list[str], shown: list[int], size: int) -> Image.Image:
    """A white strip ``width`` wide: a swatch and the name of each label in ``shown``, wrapped in columns."""
    colours = palette(len(names))
    font = _font(size)
    pad, row = max(3, size // 4), round(size * 1.4)
    widths = [size + pad + round(font.getlength(names[label - 1])) + 2 * pad for label in shown]
    columns = max(1, min(len(shown), width // max(max(widths), 1)))
    rows = -(-len(shown) // columns)
    strip = Image.new("RGB", (width, rows * row + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    column_width = width // columns
    for j, label in enumerate(shown):
        x, y = pad + (j // rows) * column_width, pad + (j % rows) * row
        draw.rectangle([x, y + 1, x + size, y + size], fill=tuple(int(c) for c in colours[label]))
        draw.text((x + size + pad, y), names[label - 1], fill=(0, 0, 0), font=font)
    return strip


def _label_points(labels: np.ndarray, label: int) -> tuple[int, int]:
    """A pixel inside the region of ``label``: the one nearest the region's median (never outside it)."""
    ys, xs = np.nonzero(labels == label)
    cy, cx = np.median(ys), np.median(xs)
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[k]), int(ys[k])


def name_segments(picture: Image.Image, labels: np.ndarray, names: list[str]) -> Image.Image:
    """Write each present name on its region (white text, dark outline), sized like the legend."""
    size = text_size(*picture.size)
    font = _font(size)
    draw = ImageDraw.Draw(picture)
    for label in range(1, len(names) + 1):
        if not (labels == label).any():
            continue
        x, y = _label_points(labels, label)
        draw.text(
            (x, y), names[label - 1], fill=(255, 255, 255), font=font, anchor="mm",
            stroke_width=max(1, size // 8), stroke_fill=(0, 0, 0),
        )  # fmt: skip
    return picture


def _with_legend(canvas: Image.Image, names: list[str], shown: list[int]) -> Image.Image:
    if not shown:
        return canvas
    strip = legend(canvas.width, names, shown, text_size(*canvas.size))
    full = Image.new("RGB", (canvas.width, canvas.height + strip.height), (255, 255, 255))
    full.paste(canvas, (0, 0))
    full.paste(strip, (0, canvas.height))
    return full


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    alpha: float = 0.55,
    *,
    with_legend: bool = True,
    label_segments: bool = False,
) -> Image.Image:
    """Blend ``labels`` (0 = background, i = names[i-1], 255 = ignore) over ``image``; a legend below
    (``with_legend``) and each name written on its region (``label_segments``)."""
    colours = palette(len(names))
    out = image.astype(np.float32)
    fg = (labels > 0) & (labels <= len(names))
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[labels[fg]]
    canvas = Image.fromarray(out.round().astype(np.uint8))
    if label_segments:
        canvas = name_segments(canvas, labels, names)
    shown = [i for i in range(1, len(names) + 1) if (labels == i).any()]
    return _with_legend(canvas, names, shown) if with_legend else canvas


def masks_overlay(image: np.ndarray, masks: np.ndarray, names: list[str], alpha: float = 0.55) -> Image.Image:
    """Overlapping bool masks ``k h w`` over ``image``: each pixel takes the mean colour of the masks
    holding it, so an overlap shows as a mix; a legend of the non-empty masks below."""
    colours = palette(len(names))[1:].astype(np.float32)  # k 3
    cover = masks.sum(axis=0)  # h w
    mixed = np.einsum("khw,kc->hwc", masks.astype(np.float32), colours) / np.maximum(cover, 1)[..., None]
    out = image.astype(np.float32)
    fg = cover > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * mixed[fg]
    canvas = Image.fromarray(out.round().astype(np.uint8))
    shown = [i + 1 for i in range(len(names)) if masks[i].any()]
    return _with_legend(canvas, names, shown)
