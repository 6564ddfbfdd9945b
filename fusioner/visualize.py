"""Colour overlays of label maps with a legend, for `fusioner predict` and the quickstart report."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def palette(n: int) -> np.ndarray:
    """``n + 1`` RGB colours: black for background, then evenly spaced hues."""
    colours = [(0, 0, 0)]
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(colours, dtype=np.uint8)


def to_uint8(image: Tensor) -> np.ndarray:
    """``3 h w`` float in [0, 1] -> ``h w 3`` uint8."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def overlay(image: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.55) -> Image.Image:
    """Blend ``labels`` (0 = background, i = names[i-1], 255 = ignore) over ``image`` and add a legend."""
    colours = palette(len(names))
    out = image.astype(np.float32)
    fg = (labels > 0) & (labels <= len(names))
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[labels[fg]]
    canvas = Image.fromarray(out.round().astype(np.uint8))
    shown = [i for i in range(1, len(names) + 1) if (labels == i).any()]
    if not shown:
        return canvas
    font = ImageFont.load_default()
    row = 14
    legend = Image.new("RGB", (canvas.width, row * len(shown) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for j, label in enumerate(shown):
        y = 3 + j * row
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(c) for c in colours[label]))
        draw.text((20, y - 1), names[label - 1], fill=(0, 0, 0), font=font)
    full = Image.new("RGB", (canvas.width, canvas.height + legend.height), (255, 255, 255))
    full.paste(canvas, (0, 0))
    full.paste(legend, (0, canvas.height))
    return full
